"""Request handlers: one function per op a client can send, `op(engine, client_id, rid, args) -> result`,
registered by name in the op table (registry.py), and the argument checks they share (args.py,
values.py). Sessions and tensors (ops), weights and models (model_ops, init_ops), graphs (graph_ops),
breakpoint runs (run_ops), session forks (fork) and checkpoints (checkpoint)."""
