"""``twistd impush``: offline push requests to the business's push relay (HTTP-API.md 1.1)."""
