"""The broker: the daemon that accepts clients on a Unix socket and runs one program
per connection (``sockexec-py``)."""
