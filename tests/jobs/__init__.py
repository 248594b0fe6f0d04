"""Tests of the jobs layer (a package, so its conftest does not take the name
``conftest`` that the tests one folder up import helpers from)."""
