"""Destinations: object-key layout, file formats, storage backends and manifests."""
