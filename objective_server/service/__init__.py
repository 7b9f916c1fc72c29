"""The objective server's service layer, below the thin routes.

- `registry`: the runs this process knows (config, policy, cached timeline and mixtures)
- `batches`: address -> timeline -> mixture -> generated batch, with an LRU and per-rank prefetch
- `generation`: the worker pool that generates batches off the event loop
- `losses`: loss posts and the exactly-once policy updates they trigger
- `runs`: creating and describing runs, mixtures, objectives
- `services`: all of the above for one app (`Services.start(settings)` opens the store and the
  corpus, starts the pool and registers the configured runs), closed together
- `errors`: what the service layer raises (app.py maps each to an HTTP status)

Submodules are imported where they are used, not here: a generation worker process imports only
`generation` and what it needs (not the policies, which bring torch), so it starts quickly.
"""
