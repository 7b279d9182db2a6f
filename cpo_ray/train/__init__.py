"""Stage 2, train: tokenized Parquet in, a trained model out.

Reads `<data_dir>/{train,eval}/*.parquet` (cpo_ray.data); writes Ray Train checkpoints from every rank to
`train.storage_path`, `metrics.jsonl` / `events.jsonl` / `train_eval.json`, and the export: `final/` (merged
Hugging Face model) and `adapter/` (LoRA).

    trainer.py       the driver: TorchTrainer over the train stream, the export copied into the run
    worker.py        what each Ray Train worker runs: the loop, metrics, held-out scores, checkpoints
    engine.py        DeepSpeed engine, optimizer and LR schedule      model.py   model build (+LoRA), export
    collate.py       micro-batch layouts (padded, packed, shared prompt), length grouping, rank balancing
    logps.py         response-token log-probs (response-only LM head), the root module, the start-up check
    heads.py         per-architecture LM-head transforms          attention.py   packed / shared-prompt attention
    loss.py          the CPO objective and its variants           gradsync.py    overlapped ZeRO-0 all-reduce
    microbatches.py  epochs of a worker's shard, resume skipping  heldout.py     in-training held-out scores
    runstate.py      resume and the run files rank 0 keeps        progress.py    the driver's console follower
"""
