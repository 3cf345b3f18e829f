"""The benchmark grid: models x datasets x seeds through ``run_recbole_ilora``'s steps, resumable, with reports.

    python benchmarks/grid.py                       # the whole grid (hours on 2 CPU cores); rerun to resume
    python benchmarks/grid.py --datasets ml-100k --seeds 2020 --rows SASRec iLoRA UniformLoRA
    python benchmarks/grid.py --status              # what is done and what is pending, without running
    python benchmarks/grid.py --report-only         # rewrite results/ from the finished runs
    python benchmarks/grid.py --quick --output /tmp/quick   # a tiny grid (minutes), as the test suite runs it
    python benchmarks/grid.py --protocol lapse      # CaseQ's temporal shift (results/lapse/)
    python benchmarks/grid.py --protocol continual  # PESO's continual training over time blocks (results/continual/)

Every run is a subprocess (``--worker``) that trains and tests one row on one dataset with one seed and writes
``<output>/runs/<dataset>/<row>-seed<seed>-<hash>.json`` atomically when it has finished; ``<hash>`` digests the
run's resolved RecBole configuration, so a finished run is skipped and a changed setting is run anew. Killing the
grid loses little: rerun it, and the killed run resumes from its last training state (an LLM row writes one every
10 training batches and when training ends); a generative row killed in its tests goes on from the scores and answers
they had journaled. Checkpoints, logs and the embedded LLaMA go to ``--work`` (not committed).
Several grid processes may share ``--output`` and ``--work`` (one per core): runs are locked while they run, so the
processes split the pending runs between them.

Rows: RecBole's Pop, GRU4Rec, Caser, SASRec and BERT4Rec (RecBole's defaults, the training budget of
``properties/benchmark/baselines.yaml``); ``SASRec-encoder``, the SASRec that iLoRA's shipped defaults pretrain
(``sasrec_*`` keys), trained once per dataset and seed and given, frozen, to every LLM row of that dataset and seed;
UniformLoRA; iLoRA (4 experts x rank 2, SASRec gate); and iLoRA's ablations: experts at total rank 8 (K1, K2, K8)
and the gate input (uniform, prompt_mean). LLM rows run with the shipped defaults; nothing is tuned on any split.
Each run is tested on the same loaders (``test_modes`` of ``properties/dataset/``: full ranking and uni19).

After the runs, ``<output>/<dataset>.md`` (tables: mean +- std over seeds per protocol, best per column in bold,
gate statistics, commands, commit, hardware, wall times, the dataset's statistics and property file),
``<output>/<dataset>.png`` (full NDCG@10 and uni19 Hit@1 per row) and ``<output>/<dataset>.gates.png`` (how
iLoRA's gate routes users, next to the prompt-mean and uniform gates) are written.
"""
