"""CliqueCluster: from N candidate images to the N0 images most likely to be fine-tuning images (paper Sec. 4.3).

The pieces, in the order the data flows through them:

- ``similarities``: cosine similarities of the unit descriptors as integers (units of 1e-5), so that every
  comparison below is exact and the same on every machine;
- ``cliques``: the exact clique engine, the paper's greedy clique partition within a work budget, and the greedy
  clique cover for pieces too dense for it;
- ``thresholds``: the threshold graphs "similarity >= t" on the paper's grid (25th percentile start, +0.01 steps);
- ``methods``: the single-threshold rules (the paper's, ``best_threshold``, ``complete_linkage``);
- ``ranking`` and ``ranked``: the memorisation score, and the default rule that ranks cliques of every threshold by it;
- ``result``: the public call ``cluster_candidates`` and its ``ClusterResult``, the methods (``METHODS``, one line
  each in ``METHOD_DESCRIPTIONS``) and the completion that makes every method answer N0 clusters.

All methods are deterministic (same embeddings in, same clusters out). The centre of a cluster is the member with the
highest summed similarity to its cluster (= nearest the mean descriptor); ties go to the smallest index. The rules,
with their figures, are in docs/clustering.md.
"""
from .cliques import DEFAULT_WORK_BUDGET, WorkBudgetExceeded, greedy_clique_partition
from .result import DEFAULT_MIN_CLIQUE_SIZE, METHOD_DESCRIPTIONS, METHODS, ClusterResult, cluster_candidates
from .similarities import SIMILARITY_SCALE, START_PERCENTILE, quantised_similarities
from .thresholds import THRESHOLD_STEP

__all__ = ["DEFAULT_MIN_CLIQUE_SIZE", "DEFAULT_WORK_BUDGET", "METHODS", "METHOD_DESCRIPTIONS", "SIMILARITY_SCALE",
           "START_PERCENTILE", "THRESHOLD_STEP", "ClusterResult", "WorkBudgetExceeded", "cluster_candidates",
           "greedy_clique_partition", "quantised_similarities"]
