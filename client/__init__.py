"""Python clients for the adapterctl gRPC API and the adapterctl CLI."""
