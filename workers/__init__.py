"""The deployable refresh-worker program: settings for plain ``rq worker`` and a container image."""
