"""The LiveLM daemon: config, wiring, transports, engine, model and kernels."""
