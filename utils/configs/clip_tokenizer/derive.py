"""How vocab.json and merges.txt here were made (run once; stages only read the results).

    python utils/configs/clip_tokenizer/derive.py path/to/bpe_simple_vocab_16e6.txt.gz

The source is OpenAI CLIP's BPE vocabulary, as shipped in the open_clip_torch wheel
(open_clip/bpe_simple_vocab_16e6.txt.gz). The vocabulary is built as CLIP's tokenizer builds it: the
256 byte characters, the same with "</w>", the first 48894 merges joined, then <|startoftext|> and
<|endoftext|>, 49408 tokens in all; merges.txt is those merges in Hugging Face's format.
"""

import gzip
import json
import os
import sys

MERGES = 49152 - 256 - 2  # CLIP's vocabulary size less the byte tokens and the two special tokens, as CLIP counts


def byte_characters():
    """CLIP's (and GPT-2's) reversible map of the 256 bytes to printable characters, in byte-token order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def main(source):
    merges = gzip.open(source).read().decode("utf-8").split("\n")[1:MERGES + 1]
    characters = byte_characters()
    vocab = characters + [c + "</w>" for c in characters] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == len(set(vocab)) == 49408
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(here, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
