"""Proving ground (issue 4): in a small trained world, does model guidance extract the fine-tuning images, and by how much?

    .host/venv/bin/python -m lab.proving_ground [--images DIR] [--concepts 1] [--n0 5] [--seeds 0,1] [--out DIR]

Builds or reuses the world (cache/world/<spec digest>: pretrained model + fine-tunes), fine-tunes every concept
DreamBooth-style and with the paper's LoRA (--styles picks the kinds, and can add kohya's LoCon), reads each
fine-tune's caption back from its weights alone (Appendix A, through lab/world/caption.py), then for each fine-tune
samples N = 50 x N0 candidates per method through the pack's own guider (build_guider + sample_with_guider: same
sampler, steps and seeds for every method), clusters them with the pack's clustering and scores the N0 extracted
images with the pack's metrics against the fine-tuning images. Methods: direct, cfg and finextract with the true
caption (the paper's Table 1); with --methods all also both with ComfyUI's RescaleCFG patch on the fine-tuned model,
cfg and finextract with the recovered caption and model guidance with the empty caption (Table 7), plain
unconditional sampling. Writes results.json (every figure per concept and seed, and as mean and standard deviation
over the concept-seed pairs, with chance floors; each fine-tune's memorisation and recovered caption) and
extraction.png (training images and each method's extractions). Concept i's caption is "a <rare token i> photo"; the
default images are 24 scikit-image samples that stay distinct at 32x32 (data.DEFAULT_IMAGE_NAMES), N0 consecutive
files per concept.

Fine-tuning strength (--strength light|partial|saturated, the paper's lambda) is a memorisation target, measured on
the fine-tuned model alone: training stops once its denoising loss on the training images has gone 20 / 40 / 70 % of
the way from the pretrained model's to the exact memoriser's (training.MemorisationProbe), within a step cap.

Budget: the world's training step (32 images, 2 threads) costs about 0.34 s on an idle 2-core Intel Xeon, 0.46 s on
a 2-core AMD EPYC with AVX-512 and about twice the Intel's on one without. The default run (one concept, N0 = 5, one
seed, the paper's methods) took 16 minutes from nothing on the AMD EPYC with AVX-512, host built (pretraining 1,000
steps is 7.7 of them), and 2.2 minutes cached; docs/proving-ground.md has its parts. --methods all adds the RescaleCFG,
Table 7 and no-caption rows (about 3x the sampling time), --scales 1.5,2,3,5 a w' sweep for cfg and finextract
(about 2.5x); each extra seed or concept repeats its fine-tunes and sampling.

What the world is: 32x32 RGB procedural images (a shaded background with a named texture, one captioned shape at a
named place, clutter) with 6-word captions; a 0.8 M-parameter UNet with self- and cross-attention at 32x32, 16x16
and 8x8 (SD layer names, 32 channels at 32x32) and a small transformer text encoder, pretrained for 1,000 steps
(lab/world); its weights depend on the CPU's float kernels, so figures hold for the machine that built the world.
What it can show: whether, in a real trained text-to-image model, guiding a fine-tune away from its base (Eq. 13,
Eq. 6) makes memorised fine-tuning images likelier than direct sampling or CFG on the same seeds, measured with the
pack's own sampler, clustering and metrics, and whether the caption can be read from the weights. What it cannot
show: the paper's numbers. The base model is weak, 32x32 leaves little detail for a descriptor, SSCD is replaced by
high-pass pixel correlation (see lab/world/similarity.py; its chance floors are in every report), and a few concepts
of N0 = 5 make A-ESR move in steps of 0.05.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import sys
import time
from typing import NamedTuple

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG = logging.getLogger("finextract.proving_ground")
CANDIDATES_PER_IMAGE = 50  # N = 50 x N0, as in the paper
# RescaleCFG's multiplier in its own method rows: the value Lin et al. (2024) recommend and ComfyUI's node defaults to.
RESCALE_CFG_MULTIPLIER = 0.7
METHOD_SETS = ("paper", "all")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", help="folder of fine-tuning images, split by name order into concepts of N0 "
                        "(default: 24 of scikit-image's sample images that stay distinct at 32x32)")
    parser.add_argument("--concepts", type=int, default=1, help="concepts of N0 images each (the default run is one, "
                        "to fit its budget; the study in docs/proving-ground.md runs 4 concepts x 2 seeds)")
    parser.add_argument("--n0", type=int, default=5, help="fine-tuning images per concept")
    parser.add_argument("--seeds", type=_seeds, default=[0], help="seeds of the fine-tunes and of the sampling noise, "
                        "comma-separated: each seed repeats every concept (fine-tunes included), and every figure is "
                        "reported as its mean and spread over the concept-seed pairs")
    parser.add_argument("--world-seed", type=int, default=0, help="seed of the pretrained world (a new seed rebuilds it)")
    parser.add_argument("--world", help="world folder: an existing world is used as it is, a new one is built there "
                        "(default: cache/world/<digest of the default spec>)")
    parser.add_argument("--styles", type=_styles, default=["dreambooth", "lora"],
                        help="fine-tune kinds, comma-separated, from training.STRENGTHS: dreambooth, lora (the paper's "
                        "rank-8 LoRA on the attention projections), locon (kohya's LoRA with conv layers too)")
    parser.add_argument("--strength", default="partial", choices=["light", "partial", "saturated"],
                        help="fine-tuning strength (the paper's lambda)")
    parser.add_argument("--steps", type=int, default=8, help="sampling steps")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--scheduler", default="ddim_uniform")
    parser.add_argument("--scales", default="", help="extra w' values for cfg and finextract, e.g. 1.5,2,3,5")
    parser.add_argument("--methods", default="paper", choices=METHOD_SETS,
                        help="paper: direct, cfg and finextract with the true caption (Table 1); all: also "
                        "ComfyUI's RescaleCFG on cfg and finextract, both with the caption recovered from the weights "
                        "(Table 7) and the no-caption rows (about 3x the sampling time)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch CPU threads for sampling (training uses the thread count its settings name)")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "out", "proving_ground"))
    args = parser.parse_args(argv)
    # Fine-tunes are found under the world's folder by path: a relative one would be joined to itself.
    args.world = args.world and os.path.abspath(args.world)
    return args


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers separated by commas, e.g. 0,1 (got {text!r})") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seed repeated in {text!r}: each seed is a separate run")
    return seeds


def _styles(text: str) -> list[str]:
    from .world.training import STRENGTHS  # plain PyTorch: refusing a typo needs no ComfyUI host

    styles = [part.strip() for part in text.split(",") if part.strip()]
    if not styles or len(set(styles)) != len(styles):
        raise argparse.ArgumentTypeError(f"styles must be distinct names separated by commas, e.g. dreambooth,lora "
                                         f"(got {text!r})")
    unknown = [style for style in styles if style not in STRENGTHS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown fine-tune style {', '.join(unknown)}: use {', '.join(STRENGTHS)}")
    return styles


class Method(NamedTuple):
    """One sampling method of a run: the guider's mode, scale and k, the caption it is prompted with ("true",
    "recovered" or "empty") and ComfyUI's RescaleCFG multiplier on the fine-tuned model (0: no patch)."""
    name: str
    mode: str
    scale: float
    k: float
    caption: str
    rescale_cfg: float = 0.0


class ProvingGround:
    def __init__(self, args: argparse.Namespace):
        from tools.host.comfy_inprocess import load_host

        self.args = args
        self.host = load_host(threads=args.threads)
        # The lab reaches the pack through lab.product, so its modules are imported once the host has loaded the pack.
        from . import nodes as world_nodes
        from .product import pack_module
        from .world import caption, data, similarity, store, text, training

        self.world_nodes, self.store, self.data, self.text = world_nodes, store, data, text
        self.caption, self.training, self.similarity = caption, training, similarity
        self.clustering = pack_module("finextract_core.clustering")
        self.metrics = pack_module("finextract_core.metrics")
        self.guidance = pack_module("finextract_core.guidance")
        self.guider, self.guidance_nodes = pack_module("nodes.guider"), pack_module("nodes.sampling")
        self.n_candidates = CANDIDATES_PER_IMAGE * args.n0

    # ------------------------------------------------------------------------------------------------- sampling
    def sample(self, guider, seed: int) -> torch.Tensor:
        """N candidates (N, 3, 32, 32) in [0, 1] and the seconds it took."""
        latent = {"samples": torch.zeros(self.n_candidates, 3, self.data.RESOLUTION, self.data.RESOLUTION)}
        started = time.perf_counter()
        samples = self.guidance_nodes.sample_with_guider(guider, latent, seed, self.args.steps, self.args.sampler,
                                                               self.args.scheduler, 1.0)
        images = self.world_nodes.WorldDecode.execute(samples).args[0].movedim(-1, 1)
        return images, time.perf_counter() - started

    def pretrained_with_caption(self, pretrained, positive, negative, seed: int):
        """Chance floor: the pretrained model prompted with the concept's caption (ComfyUI's own guider, cfg 1)."""
        import comfy.samplers

        guider = comfy.samplers.CFGGuider(pretrained)
        guider.set_conds(positive, negative)
        guider.set_cfg(1.0)
        return self.sample(guider, seed)

    # ----------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, candidates: torch.Tensor, references: torch.Tensor) -> dict:
        """Cluster N candidates to N0 with the pack's clustering, score the centres with the pack's metrics."""
        n0 = references.shape[0]
        high, high_refs = self.similarity.highpass_embeddings(candidates), self.similarity.highpass_embeddings(references)
        pixel, pixel_refs = self.similarity.pixel_embeddings(candidates), self.similarity.pixel_embeddings(references)
        try:
            clusters = self.clustering.cluster_candidates(high, n0, method="paper")
            note = None
        except ValueError as error:  # no threshold gave N0 cliques: the monotone method always can
            clusters = self.clustering.cluster_candidates(high, n0, method="complete_linkage")
            note = f"paper clustering failed ({error}); complete_linkage used"
        centres = list(clusters.centres)
        scored = self.metrics.extraction_metrics(high_refs, high.subset(centres))
        return {
            **_figures(scored),
            "saturation": saturation(candidates),
            "per_reference": list(scored.best_score),
            "best_of_all_candidates": _figures(self.metrics.extraction_metrics(high_refs, high)),
            "pixel": _figures(self.metrics.extraction_metrics(pixel_refs, pixel.subset(centres))),
            "clusters": {"threshold": clusters.threshold, "sizes": list(clusters.sizes), "centres": centres,
                         "note": note},
            "extracted": candidates[centres],
        }

    # ---------------------------------------------------------------------------------------------------- a run
    def methods(self, style: str) -> list["Method"]:
        """The paper's defaults plus any extra --scales with the true caption; with --methods all also cfg and
        finextract at their defaults with ComfyUI's RescaleCFG patch on the fine-tuned model (rows of their own: never
        a default), the paper's Table 7 rows with the caption recovered from the weights, and the no-caption case."""
        defaults = self.guidance.DREAMBOOTH_DEFAULTS if style == "dreambooth" else self.guidance.LORA_DEFAULTS
        extra = [float(s) for s in self.args.scales.split(",") if s]
        cfg_scales = sorted({self.guidance.CFG_DEFAULT_SCALE, *extra})
        finextract_scales = sorted({defaults["scale"], *extra})
        cfg_default, finextract_default = self.guidance.CFG_DEFAULT_SCALE, defaults["scale"]
        rescale = RESCALE_CFG_MULTIPLIER
        paper = ([Method("direct", "direct", 1.0, 0.0, "true")]
                 + [Method(f"cfg w'={s:g}", "cfg", s, 0.0, "true") for s in cfg_scales]
                 + [Method(f"finextract w'={s:g} k={defaults['k']:g}", "finextract", s, defaults["k"], "true")
                    for s in finextract_scales])
        if self.args.methods == "paper":
            return paper
        return (paper
                + [Method(f"RescaleCFG {rescale:g}: cfg w'={cfg_default:g}", "cfg", cfg_default, 0.0, "true", rescale),
                   Method(f"RescaleCFG {rescale:g}: finextract w'={finextract_default:g} k={defaults['k']:g}",
                          "finextract", finextract_default, defaults["k"], "true", rescale)]
                + [Method(f"recovered caption: cfg w'={cfg_default:g}", "cfg", cfg_default, 0.0, "recovered"),
                   Method(f"recovered caption: finextract w'={finextract_default:g} k={defaults['k']:g}",
                          "finextract", finextract_default, defaults["k"], "recovered"),
                   Method(f"no caption: model_guidance w={finextract_default:g}", "model_guidance",
                          finextract_default, 0.0, "empty"),
                   Method("no caption: unconditional", "direct", 1.0, 0.0, "empty")])

    def rescaled(self, model, multiplier: float):
        """``model`` with ComfyUI's own RescaleCFG node applied (the guider replays the CFG function it sets)."""
        return self.host.nodes.NODE_CLASS_MAPPINGS["RescaleCFG"]().patch(model, multiplier)[0]

    def recover_caption(self, world, path: str, style: str, caption: str, seed: int) -> dict:
        """The caption read back from the fine-tune's weights alone (Appendix A), and whether its keyword is there."""
        from safetensors.torch import load_file

        weights = load_file(path)
        if style != "dreambooth":
            fine_tuned = self.training.merge_lora(world.unet, weights)
        else:
            fine_tuned = self.store.new_modules(world.spec)[0]
            fine_tuned.load_state_dict(weights)
        started = time.perf_counter()
        recovered = self.caption.recover_caption(world.unet, fine_tuned.eval(), world.text_encoder,
                                                 words=len(caption.split()), seed=seed)
        keyword = next(word for word in caption.split() if word in self.text.RARE_TOKENS)
        ranking = [word for word, _ in recovered.words]
        return {"caption": recovered.caption, "keyword": keyword, "keyword_rank": ranking.index(keyword) + 1,
                "keyword_top1": ranking[0] == keyword, "keyword_in_caption": keyword in recovered.caption.split(),
                "top_words": [[w, round(v, 4)] for w, v in recovered.words[:5]],
                "captions": [[c, round(v, 4)] for c, v in recovered.captions[:5]],
                "exhaustive_best": [recovered.exhaustive_best[0], round(recovered.exhaustive_best[1], 4)],
                "seconds": round(time.perf_counter() - started, 1)}

    def run(self, paths: list[list[str]]) -> dict:
        """Every method on every concept (``paths``: N0 image files per concept) and seed; the report."""
        args, started = self.args, time.perf_counter()
        world_started = time.perf_counter()
        if args.world and os.path.exists(os.path.join(args.world, self.store.SPEC_FILE)):
            try:
                world = self.store.load(args.world)  # any built world, whatever its spec
            except ValueError as error:
                raise SystemExit(f"--world {args.world}: {error}") from None
        else:
            spec = self.store.WorldSpec(seed=args.world_seed)
            world = self.store.build_or_load(args.world or os.path.join(REPO_ROOT, "cache", "world", spec.digest()), spec)
        world_seconds = time.perf_counter() - world_started
        folder, spec = world.folder, world.spec
        pretrained, text_encoder = self.world_nodes.WorldLoader.execute(folder, "").args
        encode = lambda caption: self.world_nodes.WorldTextEncode.execute(text_encoder, caption).args[0]  # noqa: E731
        empty = encode("")
        concepts, fine_tune_seconds = [], 0.0
        for run_seed, (index, files) in itertools.product(args.seeds, enumerate(paths)):
            caption = self.text.concept_caption(index)
            images = np.stack([self.data.load_image(p) for p in files])
            references = torch.from_numpy((images + 1) / 2)
            positive, seed = encode(caption), run_seed * 1000 + index
            LOG.info(f"seed {run_seed}, concept {index} ({caption!r}): {', '.join(os.path.basename(p) for p in files)}")
            floor_images, _ = self.pretrained_with_caption(pretrained, positive, empty, seed)
            random_images, _ = self.data.procedural_batch(np.random.default_rng(seed), self.n_candidates,
                                                          drop_captions=False)
            concept = {"index": index, "seed": run_seed, "caption": caption, "images": [os.path.basename(p) for p in files],
                       "references": references, "reference_saturation": saturation(references), "styles": {},
                       "floors": {"random_pretraining_images": self.evaluate(torch.from_numpy((random_images + 1) / 2),
                                                                             references),
                                  "pretrained_with_caption": self.evaluate(floor_images, references)}}
            for style in args.styles:
                settings = self.training.STRENGTHS[style][args.strength]
                tuned = time.perf_counter()
                path = self.store.build_or_load_fine_tune(world, images, caption, settings, seed=run_seed + index)
                fine_tune_seconds += time.perf_counter() - tuned
                described = self.store.fine_tune_record(path)
                recovery = self.recover_caption(world, path, style, caption, seed)
                LOG.info(f"  {style:10s} memorisation {described['record']['memorisation']}"
                         f", recovered caption {recovery['caption']!r} (keyword rank {recovery['keyword_rank']})")
                fine_tuned = self.load_fine_tune(folder, pretrained, path, style)
                prompts = {"true": positive, "recovered": encode(recovery["caption"]), "empty": empty}
                results = {}
                for name, mode, scale, k, prompt, rescale in self.methods(style):
                    model = self.rescaled(fine_tuned, rescale) if rescale else fine_tuned
                    guider = self.guider.build_guider(model, pretrained, prompts[prompt], empty, mode, scale, k)
                    candidates, seconds = self.sample(guider, seed)
                    results[name] = {"mode": mode, "scale": scale, "k": k, "caption": prompt, "rescale_cfg": rescale,
                                     "seconds": round(seconds, 1), **self.evaluate(candidates, references)}
                    LOG.info(f"  {style:10s} {name:45s} AS {results[name]['AS']:.3f}  A-ESR0.6 "
                             f"{results[name]['A-ESR 0.6']:.2f}  A-ESR0.7 {results[name]['A-ESR 0.7']:.2f}  "
                             f"best-of-N AS {results[name]['best_of_all_candidates']['AS']:.3f}  ({seconds:.0f} s)")
                concept["styles"][style] = {"fine_tune": {"file": os.path.relpath(path, folder), **described},
                                            "caption_recovery": recovery, "methods": results}
            concepts.append(concept)
        report = {
            "settings": {**vars(args), "images": args.images or "scikit-image samples (data.DEFAULT_IMAGE_NAMES)",
                         "world": folder,
                         "n_candidates": self.n_candidates, "clustering": "paper (min clique size 2)"},
            "descriptor": self.similarity.__doc__.strip(),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "load_average_at_end": [round(v, 2) for v in os.getloadavg()]},
            "world": {"spec": spec.to_dict(), "digest": spec.digest(), "build_or_load_seconds": round(world_seconds, 1)},
            "seconds": {"world": round(world_seconds, 1), "fine_tunes": round(fine_tune_seconds, 1),
                        "total": round(time.perf_counter() - started, 1)},
            "summary": summarise(concepts),
            "fine_tunes_and_caption_recovery": summarise_fine_tunes(concepts),
            "concepts": [{k: v for k, v in c.items() if k != "references"} for c in concepts],
        }
        return report, concepts

    def load_fine_tune(self, folder: str, pretrained, path: str, style: str):
        if style == "dreambooth":
            return self.world_nodes.WorldLoader.execute(folder, path).args[0]
        import comfy.sd
        import comfy.utils

        return comfy.sd.load_lora_for_models(pretrained, None, comfy.utils.load_torch_file(path, safe_load=True),
                                             1.0, 0.0)[0]


def saturation(images: torch.Tensor) -> float:
    """The share of pixel values (every channel of every image) at the limits of the [0, 1] range: a guidance that
    extrapolates too far drives samples into flat black and white, which the decoder's clipping hides."""
    return round(float(((images <= 0) | (images >= 1)).double().mean()), 4)


def _figures(scored) -> dict:
    rates = scored.extraction_success_rates
    return {"AS": round(scored.average_similarity, 4), "A-ESR 0.6": rates[0.6], "A-ESR 0.7": rates[0.7]}


def _mean_and_spread(values: list[float]) -> dict:
    return {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4)}


def summarise(concepts: list[dict]) -> dict:
    """Per style and method: every figure as its mean and standard deviation over the concept-seed pairs."""
    def table(entries: list[dict]) -> dict:
        return {"AS": _mean_and_spread([e["AS"] for e in entries]),
                "A-ESR 0.6": _mean_and_spread([e["A-ESR 0.6"] for e in entries]),
                "A-ESR 0.7": _mean_and_spread([e["A-ESR 0.7"] for e in entries]),
                "best_of_all_candidates_AS": _mean_and_spread([e["best_of_all_candidates"]["AS"] for e in entries]),
                "pixel_AS": _mean_and_spread([e["pixel"]["AS"] for e in entries]),
                "saturation": _mean_and_spread([e["saturation"] for e in entries]),
                **({"seconds": _mean_and_spread([e["seconds"] for e in entries])} if "seconds" in entries[0] else {})}

    summary = {"floors": {name: table([c["floors"][name] for c in concepts]) for name in concepts[0]["floors"]}}
    for style in concepts[0]["styles"]:
        summary[style] = {name: table([c["styles"][style]["methods"][name] for c in concepts])
                          for name in concepts[0]["styles"][style]["methods"]}
    return summary


def summarise_fine_tunes(concepts: list[dict]) -> dict:
    """Per style: memorisation reached, steps run, and how often the caption's keyword was read back."""
    summary = {}
    for style in concepts[0]["styles"]:
        blocks = [c["styles"][style] for c in concepts]
        recoveries = [b["caption_recovery"] for b in blocks]
        summary[style] = {
            "memorisation": _mean_and_spread([b["fine_tune"]["record"]["memorisation"] for b in blocks]),
            "steps_run": [b["fine_tune"]["record"]["steps_run"] for b in blocks],
            "keyword_top1_word_fraction": float(np.mean([r["keyword_top1"] for r in recoveries])),
            "keyword_in_top3_words_fraction": float(np.mean([r["keyword_rank"] <= 3 for r in recoveries])),
            "keyword_in_best_caption_fraction": float(np.mean([r["keyword_in_caption"] for r in recoveries])),
            "recovered_captions": [r["caption"] for r in recoveries],
        }
    return summary


def summary_table(summary: dict) -> str:
    """The summary as aligned text: mean (standard deviation over the concept-seed pairs) per figure."""
    columns = {"AS": "AS", "A-ESR 0.6": "A-ESR 0.6", "A-ESR 0.7": "A-ESR 0.7",
               "best_of_all_candidates_AS": "best-of-N AS", "pixel_AS": "pixel AS", "saturation": "saturation"}
    lines = [f"{'mean (std over concept-seed pairs)':62s}" + "".join(f"{c:>22s}" for c in columns.values())]
    for group, methods in summary.items():
        for name, figures in methods.items():
            cells = "".join(f"{figures[c]['mean']:>14.3f} ({figures[c]['std']:.3f})" for c in columns)
            lines.append(f"{group + ': ' + name:62s}{cells}")
    return "\n".join(lines)


def strip_tensors(value):
    if isinstance(value, dict):
        return {k: strip_tensors(v) for k, v in value.items() if not isinstance(v, torch.Tensor)}
    if isinstance(value, list):
        return [strip_tensors(v) for v in value]
    return value


def draw_figure(concepts: list[dict], path: str, scale: int = 2) -> None:
    """Per concept: the training images, then each method's extracted images with their best-match scores."""
    from PIL import Image, ImageDraw

    tile, label_width, gap = 32 * scale, 440, 4
    rows = []
    for concept in concepts:
        rows.append((f"{concept['caption']} (seed {concept['seed']}): training images", concept["references"], None))
        rows.append(("floor: pretrained + caption", concept["floors"]["pretrained_with_caption"]["extracted"],
                     concept["floors"]["pretrained_with_caption"]["AS"]))
        for style, block in concept["styles"].items():
            for name, result in block["methods"].items():
                rows.append((f"{style}: {name}", result["extracted"], result["AS"]))
    columns = max(len(images) for _, images, _ in rows)
    canvas = Image.new("RGB", (label_width + columns * (tile + gap), len(rows) * (tile + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (label, images, score) in enumerate(rows):
        top = row * (tile + gap)
        draw.text((4, top + tile // 3), label + ("" if score is None else f"  AS {score:.3f}"), fill="black")
        for column, image in enumerate(images):
            pixels = (image.clamp(0, 1).movedim(0, -1).numpy() * 255).round().astype(np.uint8)
            canvas.paste(Image.fromarray(pixels).resize((tile, tile), Image.NEAREST),
                         (label_width + column * (tile + gap), top))
    canvas.save(path)


def concept_image_paths(args: argparse.Namespace) -> list[list[str]]:
    """N0 image files per concept, checked before the host loads and the world trains, so that a wrong folder is
    refused in seconds."""
    from .world import data  # plain Python and PIL: no ComfyUI needed

    try:
        files = data.list_images(args.images) if args.images else data.default_image_paths()
        return data.split_concepts(files, args.concepts, args.n0)
    except (OSError, ValueError) as error:
        raise SystemExit(f"--images {args.images or '(the default images)'}: {error}") from None


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    paths = concept_image_paths(args)
    os.makedirs(args.out, exist_ok=True)
    report, concepts = ProvingGround(args).run(paths)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(strip_tensors(report), handle, indent=2)
    draw_figure(concepts, os.path.join(args.out, "extraction.png"))
    LOG.info(f"wrote {args.out}/results.json and extraction.png in {report['seconds']['total']:.0f} s")
    print(summary_table(report["summary"]))
    print(json.dumps(report["fine_tunes_and_caption_recovery"], indent=1))


if __name__ == "__main__":
    main()
