"""Generated gRPC code for adapterctl.v1 (run `make proto`; do not edit)."""
