"""Using a trained model: `ctxtrain translate`, `generate` and `eval`.

SOURCE is a run directory (its newest committed checkpoint, verified and consolidated on the fly, wherever
`checkpoint.storage` put it) or an `export` folder (model.safetensors + config.json + tokenizer.json). The
tokenizer and special ids are those of the run's data. Decoding is `ctxtrain.model.decode` (KV cache).

    ctxtrain translate runs/en_fr --input sentences.txt [--beam 4] [--max-len 128] [--out out.txt]
    ctxtrain generate runs/lm_tiny --prompt "def main(" [--max-new 64] [--temperature 0.8 --top-p 0.9]
    ctxtrain eval runs/en_fr [--split val] [--beam 4]     # BLEU and chrF, next to the copy-source baseline
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from ctxtrain.data.dataset import Dataset, data_location
from ctxtrain.errors import UserError
from ctxtrain.rundir import RunDir

BATCH = 32  # sentences decoded together


@dataclass
class Loaded:
    model: torch.nn.Module
    kind: str  # "lm" or "encdec"
    tokenizer: object
    special: dict  # pad, bos, eos, and lang_tag for translation
    max_src_len: int
    data_path: Optional[Path]  # the prepared data (eval's held-out split); None for an export folder
    where: str
    seq_len: Optional[int] = None  # the run's data.seq_len (LM windows); None for an export folder
    documents: str = ""  # the run's data.documents: its windows' documents kept apart ("ids", "positions")
    cache: object = None  # the run's data.cache (where a dataset under a URI is cached); None: the default


def run_data(cfg, kind: str) -> Loaded:
    """A run's data as `eval`, the probes and val_bleu read it, without a model: its tokenizer, special ids
    and held-out split, index.json read once (through the run's data cache for a dataset under a URI)."""
    from ctxtrain.data.tokenizer import load_tokenizer

    data_path = data_location(cfg.data.path)
    ds = Dataset(data_path, cfg.data.cache)
    return Loaded(None, kind, load_tokenizer(ds.tokenizer_path), ds.special, cfg.data.max_src_len, data_path,
                  str(data_path), cfg.data.seq_len, cfg.data.documents, cfg.data.cache)


def load_source(source: str | Path) -> Loaded:
    """The model and tokenizer of a run directory, an export folder or a Hugging Face model folder; one line
    when SOURCE is none of them."""
    from ctxtrain.data.tokenizer import load_tokenizer
    from ctxtrain.model import build_model
    from ctxtrain.model.config import ModelConfig
    from ctxtrain.model.hf import is_hf_folder

    p = Path(source)
    documents, cache = "", None
    if RunDir(p).is_run():
        from ctxtrain.checkpoint import tag_of
        from ctxtrain.export import consolidated

        cfg, meta, state = consolidated(p)
        model_cfg, frame = cfg.model, run_data(cfg, cfg.model.kind)
        special, max_src, seq_len = frame.special, frame.max_src_len, frame.seq_len
        data_path = frame.data_path
        tokenizer, cache = frame.tokenizer, frame.cache
        where = f"{p} ({tag_of(meta['step'])})"
        documents = cfg.data.documents
    elif is_hf_folder(p):  # a Hugging Face model folder (Llama, Mistral, Qwen2): compare before and after
        from ctxtrain.data.tokenizer import special_ids
        from ctxtrain.model.hf import UnsupportedModel, pretrained_fields, read_weights

        try:
            model_cfg = ModelConfig(**pretrained_fields(p))
            state = dict(read_weights(p, model_cfg))
        except UnsupportedModel as e:
            raise UserError(str(e)) from None
        tokenizer = load_tokenizer(p)
        special, max_src, data_path, where, seq_len = special_ids(p, tokenizer), 0, None, str(p), None
    elif (p / "model.safetensors").is_file() and (p / "config.json").is_file():
        from safetensors.torch import load_file

        try:
            meta = json.loads((p / "config.json").read_bytes())
            model_cfg = ModelConfig(**meta["ctxtrain_model"])
            special, max_src = meta["data"]["special"], int(meta["data"]["max_src_len"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{p / 'config.json'} is not a ctxtrain export ({type(e).__name__}: {e}); "
                            "re-run `ctxtrain export`") from None
        state = load_file(str(p / "model.safetensors"))
        tokenizer = load_tokenizer(p / "tokenizer.json")
        data_path, where, seq_len = None, str(p), None
    else:
        raise UserError(f"{p} is neither a run directory (no config.yaml), an export folder (no "
                        "model.safetensors + config.json) nor a Hugging Face model folder; pass a "
                        "train.run_dir, the --out of `ctxtrain export` or a model folder")
    model = build_model(model_cfg)
    if model_cfg.tie_embeddings:
        state.setdefault("lm_head.weight", state.get("tok_embed.weight", state.get("src_tok_embed.weight")))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not model_cfg.tie_embeddings]
    if missing or unexpected:
        raise UserError(f"{where}: the weights do not fit the model config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); re-run `ctxtrain export`")
    model.eval()
    return Loaded(model, model_cfg.kind, tokenizer, special, max_src, data_path, where, seq_len,
                  documents, cache)


def matching_data(loaded: Loaded, data: str) -> Path:
    """--data for `eval`: a prepared dataset tokenized with the source's own tokenizer (one line
    otherwise)."""

    ds = Dataset(data_location(data))
    ours = loaded.tokenizer.to_str()
    file = ds.tokenizer_path
    theirs = file.read_text() if file.is_file() else None
    if theirs is not None and json.loads(theirs) != json.loads(ours):
        raise UserError(f"--data {data} was tokenized with another tokenizer than {loaded.where}'s; prepare "
                        f"it with `ctxtrain prepare --tokenizer {loaded.where}`")
    return data_location(data)


# ---------------------------------------------------------------------------------------------------------
# Translation


def source_ids(loaded: Loaded, text: str) -> list[int]:
    """A source sentence as the model saw sources in training: [lang tag] + ids (cut) + <eos>."""
    return framed_source(loaded, loaded.tokenizer.encode(text).ids)


def framed_source(loaded: Loaded, ids: list[int]) -> list[int]:
    sp = loaded.special
    head = [sp["lang_tag"]] if sp.get("lang_tag") is not None else []
    return head + ids[: loaded.max_src_len - 1 - len(head)] + [sp["eos"]]


def translate_ids(loaded: Loaded, sources: list[list[int]], beam: int, max_len: int) -> list[list[int]]:
    from ctxtrain.model.decode import beam_search, greedy

    sp = loaded.special
    device = next(loaded.model.parameters()).device
    out: list[list[int]] = []
    for i in range(0, len(sources), BATCH):
        chunk = sources[i:i + BATCH]
        width = max(len(s) for s in chunk)
        src = torch.full((len(chunk), width), sp["pad"], dtype=torch.long)
        for j, s in enumerate(chunk):
            src[j, :len(s)] = torch.tensor(s, dtype=torch.long)
        src = src.to(device)
        src_mask = src != sp["pad"]
        bos = torch.full((len(chunk), 1), sp["bos"], dtype=torch.long, device=device)
        if beam > 1:
            out += beam_search(loaded.model, bos, max_len, sp["eos"], beam, src=src, src_mask=src_mask)
        else:
            out += greedy(loaded.model, bos, max_len, sp["eos"], src=src, src_mask=src_mask)
    return out


def translate_lines(loaded: Loaded, lines: list[str], beam: int = 1, max_len: int = 128) -> list[str]:
    if loaded.kind != "encdec":
        raise UserError(f"{loaded.where} is a language model (model.kind=lm); `translate` needs an "
                        "encoder-decoder run; use `ctxtrain generate` for an LM")
    ids = translate_ids(loaded, [source_ids(loaded, line) for line in lines], beam, max_len)
    return [loaded.tokenizer.decode(t) for t in ids]


def read_lines(path: str) -> list[str]:
    """One sentence a line from FILE or '-' (stdin); an empty input is refused in one line."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--input {path}: cannot be read as UTF-8 text ({e}); pass a text file, one sentence "
                        "a line, or - for stdin") from None
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise UserError(f"--input {path}: no sentence to translate (empty); pass one sentence a line")
    return lines


# ---------------------------------------------------------------------------------------------------------
# Generation


def generate(loaded: Loaded, prompt: str, max_new: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0) -> str:
    from ctxtrain.model.decode import greedy, sample

    if loaded.kind != "lm":
        raise UserError(f"{loaded.where} is an encoder-decoder; `generate` needs an LM run; use `ctxtrain "
                        "translate`")
    ids = loaded.tokenizer.encode(prompt).ids or [loaded.special["eos"]]
    tokens = torch.tensor([ids], dtype=torch.long)
    eos = loaded.special["eos"]
    if temperature > 0:
        out = sample(loaded.model, tokens, max_new, eos, temperature, top_k, top_p,
                     generator=torch.Generator().manual_seed(seed))[0]
    else:
        out = greedy(loaded.model, tokens, max_new, eos)[0]
    return prompt + loaded.tokenizer.decode(out)


# ---------------------------------------------------------------------------------------------------------
# Evaluation


def bleu_chrf(hypotheses: list[str], references: list[str]) -> tuple[float, float]:
    """Corpus BLEU and chrF of sacreBLEU (its default 13a tokenization), the scores MT papers report."""
    import sacrebleu

    return (sacrebleu.corpus_bleu(hypotheses, [references]).score,
            sacrebleu.corpus_chrf(hypotheses, [references]).score)


def held_out_pairs(loaded: Loaded, split: str, limit: Optional[int] = None) -> list[tuple[list[int],
                                                                                          list[int]]]:
    """(source ids, target ids) of the split, in shard order: the pairs training never saw (val)."""
    from ctxtrain.data.shards import iter_shard

    if loaded.data_path is None:
        raise UserError(f"{loaded.where} is an export folder; `eval` reads the held-out split of the run's "
                        "data: pass the run directory")
    ds = Dataset(loaded.data_path, loaded.cache)
    shards = ds.shards(split)
    if not shards:
        raise UserError(f"data.path={loaded.data_path} has no {split} shards; pass --split with one it has")
    pairs = []
    for shard in shards:
        for src, tgt in iter_shard(shard, ds.dtype, ("src.npy", "tgt.npy")):
            pairs.append((src.tolist(), tgt.tolist()))
            if limit and len(pairs) >= limit:
                return pairs
    return pairs


def evaluate_translation(loaded: Loaded, split: str = "val", beam: int = 1, max_len: int = 128,
                         limit: Optional[int] = None) -> dict:
    pairs = held_out_pairs(loaded, split, limit)
    sources = [framed_source(loaded, s) for s, _ in pairs]
    hyps = [loaded.tokenizer.decode(t) for t in translate_ids(loaded, sources, beam, max_len)]
    refs = [loaded.tokenizer.decode(t) for _, t in pairs]
    copies = [loaded.tokenizer.decode(s) for s, _ in pairs]
    bleu, chrf = bleu_chrf(hyps, refs)
    copy_bleu, copy_chrf = bleu_chrf(copies, refs)
    return {"pairs": len(pairs), "bleu": bleu, "chrf": chrf, "copy_bleu": copy_bleu, "copy_chrf": copy_chrf,
            "examples": list(zip(copies[:3], hyps[:3], refs[:3]))}


class ValBleu:
    """train.bleu_every: greedy BLEU and chrF of the first train.bleu_pairs held-out pairs during training.
    Every data-parallel rank decodes its share (pairs i, i + world, ...) with a plain copy of the full weights
    (outside DeepSpeed's hooks), and rank 0 scores the gathered translations in the split's order."""

    def __init__(self, cfg, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.frame = run_data(cfg, "encdec")
        pairs = held_out_pairs(self.frame, "val", cfg.train.bleu_pairs)
        self.sources = [framed_source(self.frame, s) for s, _ in pairs[rank::world]]
        self.references = [self.frame.tokenizer.decode(t) for _, t in pairs] if rank == 0 else []
        self.count = len(pairs)

    def score(self, weights: dict, device: torch.device, gather) -> Optional[dict]:
        """Decode this rank's share; on rank 0 {"val_bleu", "val_chrf"}, elsewhere None. `gather` is an
        all-gather of Python objects (every rank calls score)."""
        from ctxtrain.model import build_model

        with torch.random.fork_rng(devices=[]):  # the training run's random stream stays as it was
            model = build_model(self.cfg.model)
        model.load_state_dict(weights, strict=False)
        model.to(device).eval()
        mine = [] if not self.sources else translate_ids(
            Loaded(model, "encdec", self.frame.tokenizer, self.frame.special, self.frame.max_src_len, None,
                   ""),
            self.sources, 1, self.cfg.data.max_tgt_len)
        shares = gather([self.frame.tokenizer.decode(t) for t in mine])
        if self.rank != 0 or not self.count:
            return None
        hyps = [shares[i % self.world][i // self.world] for i in range(self.count)]
        bleu, chrf = bleu_chrf(hyps, self.references)
        return {"val_bleu": bleu, "val_chrf": chrf}


class LoopProbes:
    """train.probe_every: the context probes during training, split across the data-parallel ranks (windows
    and passkey prompts i with i % world == rank), outside the training's random stream; rank 0 merges the
    shares into probe/... scalars (`probes.flat_metrics`) and probe_s, the probe's seconds.

    greedy scoring: every rank scores its share with a plain copy of the gathered weights (outside DeepSpeed's
    hooks), passkey decoded through the KV cache. forced scoring: through the engine, forward only (its ZeRO-3
    partitions, sp groups and levers; the ranks of an sp group score one sequence between them), passkey by
    the teacher-forced argmax over the key's tokens; every rank runs as many forward passes as the others."""

    def __init__(self, cfg, rank: int, world: int):
        m = cfg.memory
        self.cfg, self.rank, self.world = cfg, rank, world
        self.lengths = cfg.probe.lengths or [cfg.data.seq_len]
        self.frame = run_data(cfg, "lm")
        levers = m.checkpoint != "none" or bool(m.loss_chunk) or bool(m.mlp_chunk)
        self.scoring = cfg.probe.scoring if cfg.probe.scoring != "auto" else (
            "forced" if cfg.parallel.sp > 1 or levers else "greedy")
        self._check()

    def _check(self) -> None:
        """Refuse, before the first step, lengths the probes cannot run at (one line on every rank)."""
        from ctxtrain import probes

        t = self.cfg.probe
        limit = self.cfg.model.max_position
        for n in self.lengths:
            if limit and n > limit:
                raise UserError(f"probe.lengths: {n} is past model.max_position={limit}, the positions "
                                "the model knows; probe at most that long (`ctxtrain probe --extrapolate` "
                                "probes beyond it)")
            for _, di, key in probes.grid([n], t.depths, t.samples, seed=0):
                try:
                    probes.passkey_prompt(self.frame.tokenizer, n, t.depths[di], key,
                                          probes.Filler(self.frame.tokenizer))
                except probes.ProbeError as e:
                    raise UserError(f"probe.lengths: {e}") from None

    def score(self, engine, gather) -> Optional[dict]:
        """Every rank calls this with the training engine; on rank 0 the probe's scalars, elsewhere None."""
        import time

        from ctxtrain import probes

        t0, t = time.perf_counter(), self.cfg.probe
        if self.scoring == "greedy":
            shares = gather(self._greedy(engine.full_weights(), engine.device))
        else:
            shares = gather(self._forced(engine.token_scores))
        if self.rank != 0:
            return None
        sums = {n: probes.PositionSums.merge([s[0][n] for s in shares]) for n in self.lengths}
        merged = {n: s.result() for n, s in sums.items() if all(s.counts)}
        if self.scoring == "greedy":
            triples = [x for s in shares for x in s[1]]
        else:  # a prompt's key is right when the slices of its sp group found every token of it
            verdicts: dict = {}
            for item, li, di, hit, need in (x for s in shares for x in s[1]):
                verdicts.setdefault(item, [li, di, 0, need])[2] += hit
            triples = [(li, di, hit == need) for li, di, hit, need in verdicts.values()]
        result = probes.tally(triples, self.lengths, t.depths, t.samples, self.scoring,
                              "sentences")
        return {**probes.flat_metrics(merged, result), "probe_s": time.perf_counter() - t0,
                "probe_scoring": self.scoring}

    def _greedy(self, weights: dict, device: torch.device):
        from ctxtrain import probes
        from ctxtrain.model import build_model

        t = self.cfg.probe
        with torch.random.fork_rng(devices=[]):
            model = build_model(self.cfg.model)
        model.load_state_dict(weights, strict=False)
        model.to(device).eval()
        sums = {n: probes.position_sums(model, (w.to(device) for i, w in enumerate(
            held_out_windows(self.frame, n, t.windows)) if i % self.world == self.rank), n)
                for n in self.lengths}
        triples, _ = probes.passkey(model, self.frame.tokenizer, self.lengths, t.depths,
                                    t.samples, device, seed=0, share=(self.rank, self.world))
        return sums, triples

    def _forced(self, token_scores):
        """This rank's bucket sums and passkey verdicts, scored through `token_scores` (Engine.token_scores):
        each sequence right-padded to a multiple of sp (causal: the padding changes nothing before it)."""
        from ctxtrain import probes
        from ctxtrain.model.transformer import IGNORE_INDEX

        t, sp = self.cfg.probe, self.cfg.parallel.sp
        sums, hits = {}, []
        filler = probes.Filler(self.frame.tokenizer)
        for li, n in enumerate(self.lengths):
            sums[n] = probes.PositionSums(n)
            items = [(None, w[0].tolist()) for w in held_out_windows(self.frame, n, t.windows)]
            for _, di, key in probes.grid([n], t.depths, t.samples, seed=0):
                p = probes.passkey_prompt(self.frame.tokenizer, n, t.depths[di], key, filler)
                items.append(((li, di, p), p.ids + p.answer))
            width = -(-max(len(ids) - 1 for _, ids in items) // sp) * sp
            for i in range(self.rank, -(-len(items) // self.world) * self.world, self.world):
                # past the end: a pass like the others'
                what, ids = items[i] if i < len(items) else (None, [])
                real = max(len(ids) - 1, 0)
                inputs = torch.zeros(1, width, dtype=torch.long)
                targets = torch.full((1, width), IGNORE_INDEX, dtype=torch.long)
                inputs[0, :real], targets[0, :real] = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
                start, scores = token_scores(inputs, targets)
                if what is None and real:  # a held-out window (positions past n: padding, left out)
                    sums[n].add(scores[..., 0], start)
                elif what is not None:
                    _, di, p = what
                    first = len(p.ids) - 1 - start  # the key's first target in this rank's slice
                    mine = scores[0, max(first, 0):max(first + len(p.answer), 0), 1]
                    hits.append(((li, i), li, di, int(mine.sum()), len(p.answer)))
        return sums, hits


def evaluate_lm(loaded: Loaded, split: str = "val", seq_len: Optional[int] = None,
                limit: Optional[int] = None) -> dict:
    """Mean token loss and perplexity on the split's first `limit` windows (all of them: None) of seq_len
    tokens (default: the run's data.seq_len), read in order as the training's evaluation reads them (a run
    trained with data.doc_mask: its documents kept apart, the loss of a window that of its documents)."""
    from ctxtrain.data.loader import StreamingLoader
    from ctxtrain.model.transformer import IGNORE_INDEX, lm_targets

    if loaded.data_path is None:
        raise UserError(f"{loaded.where} is not a run directory: `eval` needs its held-out data; pass --data "
                        "DIR (prepared with its tokenizer) and --seq-len")
    seq_len = seq_len or loaded.seq_len
    if seq_len is None:
        raise UserError(f"{loaded.where} is not a run directory: pass --seq-len, the window length to score")
    batch = max(1, min(8, (1 << 14) // seq_len))  # ~16k tokens a forward pass, a window at least
    loader = StreamingLoader(loaded.data_path, cache=loaded.cache, split=split, seq_len=seq_len,
                             batch_size=batch, rank=0, world_size=1, num_workers=0, seed=0, shuffle=False,
                             loop=False, documents=loaded.documents)
    total, windows, n = 0.0, 0, 0
    with torch.no_grad():
        for batch_ in loader:
            rows = slice(None if limit is None else limit - windows)
            tokens, docs, positions = (batch_.get(k) for k in ("tokens", "docs", "positions"))
            tokens, docs, positions = (None if t is None else t[rows] for t in (tokens, docs, positions))
            inputs, targets = lm_targets(tokens, docs)
            count = int((targets != IGNORE_INDEX).sum())
            loss = loaded.model(inputs, targets, docs=None if docs is None else docs[:, :-1],
                                positions=None if positions is None else positions[:, :-1])
            total += float(loss) * count
            n += count
            windows += tokens.shape[0]
            if limit is not None and windows >= limit:
                break
    if not n:
        raise UserError(f"the {split} split of {loaded.data_path} holds no window of {seq_len} tokens; pass "
                        "a smaller --seq-len")
    return {"windows": windows, "seq_len": seq_len, "tokens": n, "loss": total / n,
            "ppl": math.exp(min(total / n, 50.0))}


def write_lines(lines: Iterable[str], out: Optional[str]) -> None:
    text = "".join(line.replace("\n", " ") + "\n" for line in lines)
    if out:
        Path(out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------------
# Probes: how much of its context a model uses


def positionable(loaded: Loaded) -> tuple[Optional[int], str]:
    """The longest length the model positions without extrapolating, and what sets it: model.max_position
    (a pretrained or extended model), else a run's data.seq_len (the positions it trained on)."""
    limit = loaded.model.cfg.max_position
    if limit:
        return limit, "model.max_position"
    if loaded.seq_len:
        return loaded.seq_len, "the run's data.seq_len (the positions it trained on)"
    return None, ""


def run_probes(loaded: Loaded, lengths: list[int], depths: list[float], samples: int,
               filler: str = "sentences",
               scoring: str = "greedy", extrapolate: bool = False, seed: int = 0,
               windows: int = 8) -> dict:
    """`ctxtrain probe`: the loss by position at each length (on the held-out split, where there is data) and
    the passkey grid; one line for a setting the model or the data cannot honour."""
    from ctxtrain import probes

    if loaded.kind != "lm":
        raise UserError(f"{loaded.where} is an encoder-decoder; the probes measure a language model's use of "
                        "its context: pass an LM run, export or model folder")
    limit, what = positionable(loaded)
    too_long = [n for n in lengths if limit is not None and n > limit]
    if too_long and not extrapolate:
        raise UserError(f"--lengths {too_long[0]} is past the {limit} positions of {what}; pass "
                        "--extrapolate to probe beyond them (what the model does there is the question the "
                        "probe answers)")
    outside = [d for d in depths if not 0.0 <= d <= 1.0]
    if outside:
        raise UserError(f"--depths {outside[0]}: a needle's depth lies in [0, 1] (0: right after the "
                        "instruction, 1: right before the question)")
    corpus = None
    if filler == "corpus":
        corpus = probes.Filler(loaded.tokenizer, held_out_tokens(loaded))
        if len(corpus.corpus) < max(lengths):
            raise UserError(f"--filler corpus: the val split of {loaded.data_path} holds "
                            f"{len(corpus.corpus):,} tokens, fewer than a {max(lengths):,}-token prompt "
                            "needs; pass shorter --lengths, data with a larger val split, or --filler "
                            "sentences")
    out: dict = {"source": loaded.where, "lengths": lengths, "positionable": limit}
    try:
        if loaded.data_path is not None:
            out["loss_by_position"] = {str(n): probes.loss_by_position(
                loaded.model, held_out_windows(loaded, n, windows)).to_dict() for n in lengths}
        _, result = probes.passkey(loaded.model, loaded.tokenizer, lengths, depths, samples,
                                   torch.device("cpu"),
                                   corpus, scoring, seed)
    except probes.ProbeError as e:
        raise UserError(str(e)) from None
    out["passkey"] = result.to_dict()
    return out


def held_out_windows(loaded: Loaded, seq_len: int, count: int):
    """Batches of the val split's first `count` windows of seq_len tokens, in order (as `eval` reads them)."""
    from ctxtrain.data.loader import StreamingLoader

    loader = StreamingLoader(loaded.data_path, cache=loaded.cache, split="val", seq_len=seq_len, batch_size=1,
                             shuffle=False, loop=False)
    for i, batch in enumerate(loader):
        if i == count:
            return
        yield batch["tokens"]


def held_out_tokens(loaded: Loaded) -> list[int]:
    """The val split's documents' tokens in order (the passkey's corpus filler: text training never saw)."""
    from ctxtrain.data.shards import iter_shard

    if loaded.data_path is None:
        raise UserError(f"--filler corpus: {loaded.where} has no prepared data; pass --data DIR (prepared "
                        "with its tokenizer) or --filler sentences")
    ds = Dataset(loaded.data_path, loaded.cache)
    tokens: list[int] = []
    for shard in ds.shards("val"):
        for (ids,) in iter_shard(shard, ds.dtype, ("ids.npy",)):
            tokens.extend(ids.tolist())
    return tokens
