"""Examples that live beside imcluster, not in it: business servers the cluster calls (HTTP-API.md)."""
