"""The prompts train_policy trains on, and each distinct prompt's text conditioning, encoded once.

When all lines of the prompt list expand to at most ENCODED_UP_FRONT distinct texts, every one is
encoded at start and the text encoders leave the GPU for the whole run (train_offload_frozen), as with
a single prompt. A longer list (or one whose {a|b|c} variants multiply past that) is encoded per epoch:
the epoch's drawn prompts before its sampling, the previous epoch's forgotten, so the cache stays the
size of an epoch. The encoders then visit the GPU for that moment (SD1.5's 0.25 GB, SDXL's 1.6 GB in
fp16: well under a second of transfer against an epoch's minutes) and leave it before sampling.
Encoding happens where the encoders were loaded, on the GPU in the half dtype, as generate encodes:
on the CPU they would need fp32 weights (CPU half matmuls are slow or missing) and give other embeddings.
Each text is encoded alone, so its embedding is a function of the text, whatever else an epoch draws.
"""

import random

import torch

from ddpo.sampling import PROMPT_KEYS, positive_conditioning, prompt_conditioning, prompt_record
from utils.pipeline import text_encoders
from utils.prompts import epoch_prompts, expand, expansion_count, expansions

ENCODED_UP_FRONT = 256  # distinct prompts; SDXL's 256 x 77 x 2048 fp16 embeddings take 80 MB of the GPU


def pipeline_encoder(pipeline, negative_prompt, height, width, device, offload):
    """texts -> {text: prompt_conditioning(...) of that text}, the text encoders on `device` meanwhile and,
    with `offload`, back on the CPU afterwards."""
    def encode(texts):
        for encoder in text_encoders(pipeline):
            encoder.to(device)
        encoded = {text: prompt_conditioning(pipeline, text, negative_prompt, height, width, device) for text in texts}
        if offload:
            for encoder in text_encoders(pipeline):
                encoder.to("cpu")  # not needed on the GPU until the next epoch's prompts, if ever
        return encoded
    return encode


class PromptSet:
    """The run's prompt lines, what each epoch draws from them, and the conditioning of each drawn text.

    `encode` maps texts to {text: prompt_conditioning's dict of (1, ...) tensors} (pipeline_encoder). The
    cache holds each text's positive half as sample-record entries (prompt_record); the negative prompt's
    conditioning, the same for every text, is kept once. `first` is a text of the first line, for whatever
    needs one prompt (the Denoiser's own, before each batch gives it its images' prompts).
    """

    def __init__(self, lines, encode, encoded_up_front=ENCODED_UP_FRONT):
        self.lines, self.encode, self.cache = lines, encode, {}
        self.first = expand(lines[0], random.Random(0))
        self.all_up_front = sum(expansion_count(line) for line in lines) <= encoded_up_front
        self.add(sorted(set().union(*(expansions(line) for line in lines))) if self.all_up_front else [self.first])

    def add(self, texts):
        """Encode those of `texts` not encoded yet."""
        missing = sorted(set(texts) - set(self.cache))
        if not missing:
            return
        for text, conditioning in self.encode(missing).items():
            self.cache[text] = prompt_record(conditioning)
            self.negative = {key: value for key, value in conditioning.items() if key.startswith("negative_")}

    def image_prompts(self, seed, epoch, images, per_prompt):
        """[text] of the epoch's `images` images, in seed order: images // per_prompt groups of per_prompt."""
        groups = epoch_prompts(self.lines, seed, epoch, images // per_prompt)
        return [text for text in groups for _ in range(per_prompt)]

    def prepare(self, texts):
        """Before an epoch: encode its texts; per-epoch encoding forgets the earlier epochs' other texts."""
        if not self.all_up_front:
            self.cache = {text: record for text, record in self.cache.items() if text in set(texts)}
        self.add(texts)

    def conditioning(self, text):
        """The Denoiser's keyword arguments for `text` on every image: positive and negative, (1, ...) each."""
        return {**positive_conditioning(self.record([text])), **self.negative}

    def record(self, texts):
        """Sample-record entries (ddpo/sampling.py PROMPT_KEYS), row i the conditioning of texts[i]:
        prompt_embeds (n, 77, dim); SDXL's added_text_embeds (n, pooled dim), added_time_ids (n, 6)."""
        self.add(texts)
        rows = [self.cache[text] for text in texts]
        return {key: torch.cat([row[key] for row in rows]) for key in PROMPT_KEYS if key in rows[0]}
