"""Example programs that use tokencache (not part of the installed package)."""
