"""``wsshm-sweep``: the paper's data-amount study (Table 7, Figures 6-9) in one command.

``plan`` lays out the grid's jobs and shards, ``runner`` trains and evaluates them through the same
launch scripts as a hand-run training, ``report`` merges whatever cells are done, ``cli`` is the
command line. docs/sweep.md describes the rules and the folder layout.
"""
