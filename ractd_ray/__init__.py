"""The Ray glue of ractd: the only package that imports Ray.

tune/search.py and eval/reproduce_tables.py are thin command lines over these modules:
- ractd_ray.train   Ray Train adapter: runs ractd.train.train(cfg, RunContext(...)) in TorchTrainer workers.
- ractd_ray.search  the Tune search over the Eq. (9) weights (alpha, beta, sigma).
- ractd_ray.pool    the rollout actor pool that fills the results store.

The library (ractd/) never imports Ray; a user can train and evaluate without it.
"""
