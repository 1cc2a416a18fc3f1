"""Teacher engines, losses, student construction, trainer and evaluation. Never imports dagster."""
