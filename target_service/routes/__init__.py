"""HTTP routes: ``public`` (health, metrics, models, predict) and ``admin`` (clients)."""
