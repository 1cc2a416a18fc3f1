"""Teacher engines, losses, student construction, trainer and evaluation. Never imports dagster.

Rooms: ``teacher`` (labelling engines and label math), ``train`` (losses, student, trainer),
``eval`` (metrics and reports) are libraries; ``run`` orchestrates them into cached artifacts.
Shared foundations sit at this level: ``config`` (the run config), ``configbase``, ``data``
(corpus) and ``procs`` (process hygiene)."""
