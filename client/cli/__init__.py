"""The adapterctl command line: one module per noun, assembled in :mod:`main`."""
