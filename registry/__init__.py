"""Adapter registry: content-addressed blobs, versioned manifests, aliases; local and S3 backends."""
