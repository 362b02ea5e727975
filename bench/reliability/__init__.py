"""Reliability harness (issue 12): fuzzing, a soak with memory bounds and fault drills
against real parts (gRPC on loopback, moto S3 over HTTP, the real base model).
Run as ``python -m bench.reliability.run [--quick]``; see RELIABILITY.md."""
