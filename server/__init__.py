"""Inference server: engine, scheduler, adapter cache, gRPC servicer, metrics."""
