"""Inference engines behind one interface (see :mod:`adapterctl.server.types`)."""
