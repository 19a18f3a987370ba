"""Client side: connection, sessions, remote models and tensors, weight upload, transport."""
