"""Offline distillation: store a teacher's top-k once (``fastkd-topk dump``), train from the file.

Needs the ``offline`` extra (safetensors, transformers, tqdm), imported only when used.

    from fastkd.offline import TopKDataset, TopKCollator
    ds = TopKDataset("dump_dir", student_tokenizer)      # refuses another vocabulary
    loader = DataLoader(ds, batch_size=8, collate_fn=TopKCollator(tokenizer.pad_token_id))
"""

from .data import BATCH_KEYS, TopKCollator, TopKDataset, check_loss_settings
from .storage import Manifest, id_bits, pack_ids, read_manifest, unpack_ids, vocab_hash
from .writer import DumpStats, compute_shard, dump, plan_shards, topk_with_tail

__all__ = [
    "BATCH_KEYS", "DumpStats", "Manifest", "TopKCollator", "TopKDataset", "check_loss_settings",
    "compute_shard", "dump", "id_bits", "pack_ids", "plan_shards", "read_manifest",
    "topk_with_tail", "unpack_ids", "vocab_hash",
]
