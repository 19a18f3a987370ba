"""The GPU-resident server: router (sockets), engine (device), sessions, models, execution."""
