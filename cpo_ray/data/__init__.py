"""Stage 1, prepare: raw preference shards in, tokenized Parquet out.

Reads `data.train_files` / `data.eval_files` (JSONL, JSON arrays, Parquet; local or any fsspec URI) or writes the
synthetic task first; writes `<data_dir>/{train,eval}/*.parquet` (cpo_ray.contract's columns) and
`prepare_report.json` (every rejected row counted by reason, with file:line examples).

    readers.py    files -> batches of raw JSON text (pure I/O)
    formats.py    one record -> (prompt, chosen, [rejected, ...]) text, per input format
    tokenize.py   text -> prompt/response token ids, prompt masking, truncation
    prepare.py    the Ray Data pipeline over all of it, and the train stream the trainer reads
    synthetic.py  the shipped numbers-to-words task
"""
