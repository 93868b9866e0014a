"""egad's objective inside other people's training loops.

* `egad.integrations.hf.EgadTrainer`: a `transformers.Trainer` that trains a student on ordinary causal-LM batches
  (`input_ids`, `attention_mask`, `labels` with -100 on the prompt) with egad's loss against a live teacher.
* `egad.integrations.trl.EgadDistillationTrainer`: TRL's on-policy `DistillationTrainer` (generation, vLLM, data
  and teacher handling untouched) with its loss replaced by egad's; needs the `egad[trl]` extra.

Both keep their framework's loop, optimizer, scheduler, checkpointing and logging; egad supplies the loss, the
token count it is normalised by, the entropy CDF it reads and the feature projector it trains. The submodules are
imported by name (nothing is re-exported here), so `import egad.integrations.hf` never needs TRL.
"""
