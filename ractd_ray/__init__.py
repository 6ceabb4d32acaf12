"""The Ray glue of ractd: the only package that imports Ray.

tune/search.py and eval/reproduce_tables.py are thin command lines over these modules:
- ractd_ray.train   Ray Train adapter: runs ractd.train.train(cfg, RunContext(...)) in TorchTrainer workers.
- ractd_ray.search  the Tune search over the Eq. (9) weights (alpha, beta, sigma).
- ractd_ray.pool    the rollout actor pool that fills the results store.
- ractd_ray.collectives, ractd_ray.connect   the gradient all-reduce of several workers; connecting to Ray.
- ractd_ray.cluster, ractd_ray.resources, ractd_ray.console   cluster files, what the cluster can hold, quiet output.
- ractd_ray.testcluster   a cloud-like multi-node cluster on one machine (the multi-node tests, bench/multinode.py).

The library (ractd/) and the reproduction (ractd_repro/) never import Ray; a user can train and evaluate without it.
"""
