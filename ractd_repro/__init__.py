"""ractd_repro: the reproduction of the paper's tables and claims on top of the library (ractd/), Ray-free.

methods (the evaluated columns), spec (the studies: tasks x methods, budget, scale, seeds), models (the checkpoints
a study needs and how to train them), jobs (cells as evaluation jobs, blocks of seeds, rollouts to rows), baselines
(the data's and the behavior policy's level, Fig. 3's R_psi samples), store (the Parquet results store and its
statistics), paper (the paper's published numbers), tables, figures, claims (verdicts), document (docs/results.md),
sweep (the Eq. (9) weight search's configuration, Ray-free), records (the sweep's trials.parquet, best_config.json
and folder layout), studies/ (the science studies beside the claims study)."""
