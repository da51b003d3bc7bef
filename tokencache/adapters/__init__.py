"""Adapters for client libraries: google-auth credentials and a requests auth on the shared cache."""
