"""Classify text with a deployed classifier (`cliptune deploy`): numpy + onnxruntime + tokenizers only."""
import json, sys
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer

path = sys.argv[1] if len(sys.argv) > 1 else "classifier.onnx"
texts = sys.argv[2:] or ["a gripping, beautiful film", "dull and tedious"]
meta = json.load(open(path[: -len(".onnx")] + ".json"))  # the sidecar written next to the .onnx
tok = Tokenizer.from_str(meta["tokenizer_json"])  # adds [CLS] .. [SEP], pads the batch
enc = tok.encode_batch([meta["plain_template"].replace("{text}", t.replace("\\n", " ").strip()) for t in texts])
ids, mask = (np.array([getattr(e, k) for e in enc], dtype=np.int64) for k in ("ids", "attention_mask"))
probs = ort.InferenceSession(path).run(["probs"], {"input_ids": ids, "attention_mask": mask})[0]
for text, p in zip(texts, probs):
    print(f"{meta['label_names'][p.argmax()]}\t{p.max():.3f}\t{text}")
