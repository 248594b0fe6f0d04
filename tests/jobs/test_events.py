"""The event hub's routing: each subscription gets exactly the events of its name
and types, in order, whatever else is subscribed or closed (checked against a
plain filter), and an overflowed one is forgotten everywhere."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sockexec_py.jobs.events import EVENT_TYPES, Event, EventHub

NAMES = st.sampled_from([None, "a", "b"])
TYPES = st.none() | st.frozensets(st.sampled_from(sorted(EVENT_TYPES)), min_size=1)


def event(event_id: int, name: str, kind: str) -> Event:
    return Event(event_id, f"j{event_id}", name, kind, "{}")


@given(
    subscriptions=st.lists(st.tuples(NAMES, TYPES, st.booleans()), max_size=6),
    events=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(sorted(EVENT_TYPES))),
        max_size=20,
    ),
)
def test_each_subscription_gets_its_names_and_types_only(
    subscriptions: list[tuple[str | None, frozenset[str] | None, bool]],
    events: list[tuple[str, str]],
) -> None:
    hub = EventHub()
    subs = [
        (hub.subscribe(name, None, types), name, types, closed)
        for name, types, closed in subscriptions
    ]
    for sub, _, _, closed in subs:
        if closed:
            sub.close()
    assert hub.subscribers == sum(1 for *_, closed in subs if not closed)
    published = [event(i, name, kind) for i, (name, kind) in enumerate(events, 1)]
    hub.publish(published)
    for sub, name, types, closed in subs:
        wanted = [
            e.id
            for e in published
            if not closed
            and (name is None or e.name == name)
            and (types is None or e.type in types)
        ]
        assert [e.id for e in sub.take()] == wanted


def test_an_overflowed_subscription_is_forgotten_for_every_type() -> None:
    hub = EventHub(limit=2)
    full = hub.subscribe("a", None, frozenset({"queued", "finished"}))
    other = hub.subscribe(None, None, frozenset({"started"}))
    hub.publish([event(1, "a", "queued"), event(2, "a", "finished"), event(3, "a", "finished")])
    assert full.overflowed and not full.queue and hub.subscribers == 1
    hub.publish([event(4, "a", "queued"), event(5, "a", "started")])
    assert not full.queue
    assert [e.id for e in other.take()] == [5]
    full.close()  # closing what the hub dropped already is harmless
    assert hub.subscribers == 1
