"""The planted benchmark's command-line options, declared once for `raymem bench planted` and
bench/planted.py. Kept apart from raymem.planted.benchmark so that building the CLI's parser imports
neither torch nor the world builder."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raymem.planted.benchmark import PlantedConfig


def add_planted_options(parser) -> None:
    """The benchmark's command-line options, declared once for `raymem bench planted` and bench/planted.py."""
    parser.add_argument("--work", default="build/planted", help="cache and results directory")
    parser.add_argument(
        "--calibrate", action="store_true", help="fit thresholds on the world's calibration split first"
    )
    parser.add_argument("--models", help="use these trained models (pipeline/, clip/) instead of training")
    parser.add_argument("--quick", action="store_true", help="reduced world and training (minutes, no targets)")
    parser.add_argument(
        "--world-seed",
        type=int,
        help="draw a fresh world from this seed (invented names, looks, elements, posters; trains its models); "
        "default: the development world (seed 7)",
    )
    parser.add_argument(
        "--hard-cases",
        action="store_true",
        help="plant the hard cases too (copies with other bytes, paraphrased captions, templates, requested "
        "works); another world, trained on its own",
    )
    parser.add_argument(
        "--mining",
        action="store_true",
        help="scan with caption mining in a world drawn for it: a third of an MI entity's captions name its "
        "implied element (the prompts list none), three captions of every named entity mention a detail no "
        "image shows; another world, trained on its own",
    )
    parser.add_argument(
        "--region-cases",
        action="store_true",
        help="plant region copies (a room behind every image of a subject, a logo in the corner of every "
        "image of another, templates) and scan with region detection on (--region-neighbours 3 unless "
        "given); another world, trained on its own",
    )
    parser.add_argument(
        "--train-seed",
        type=int,
        help="train the world's generator with this seed (default 0: the committed models); the presence "
        "CLIP, the instrument, stays as it is",
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train the models even when the committed ones (assets/planted-models) match the configs",
    )
    parser.add_argument(
        "--region-neighbours",
        type=int,
        help="switch region-level copy detection on with this many neighbours per space, 0 off (default: "
        "off, as the scan config's default; 3 with --region-cases)",
    )
    parser.add_argument(
        "--shared-clip",
        action="store_true",
        help="scan with the CLIP trained on the generator's own images and captions instead of the "
        "independent presence CLIP (the benchmark's setup before it had one)",
    )
    parser.add_argument(
        "--presence-tower",
        choices=("vit", "resnet"),
        default="vit",
        help="the presence CLIP's image tower: vit (default; the committed one for the development world) or "
        "resnet (open_clip's ModifiedResNet, which sees few-pixel elements; trained for the world, minutes)",
    )
    parser.add_argument(
        "--untagged",
        action="store_true",
        help="index the training table without its entity tags, as a training set with CLIP embeddings only "
        "comes: every entity is judged by its text probe (same world and models; its own index)",
    )
    parser.add_argument(
        "--no-placebo-names",
        dest="placebo_names",
        action="store_false",
        help="scan with signals.placebo_names off: an entity judged by its text probe need not beat the "
        "made-up names (the labeler before them)",
    )
    parser.add_argument(
        "--mi-needs-entity",
        action="store_true",
        help="scan with thresholds.mi_needs_entity on: an implied element counts only on a prompt whose entity "
        "is rendered in at least half of its images",
    )


def planted_config_from_args(args) -> PlantedConfig:
    """`planted_config` from the options `add_planted_options` declared."""
    from raymem.planted.benchmark import planted_config

    return planted_config(
        work=args.work,
        calibrate=args.calibrate,
        models=args.models,
        retrain=args.retrain,
        region_neighbours=args.region_neighbours,
        world_seed=args.world_seed,
        quick=args.quick,
        shared_clip=args.shared_clip,
        train_seed=args.train_seed,
        hard_cases=args.hard_cases,
        mining=args.mining,
        region_cases=args.region_cases,
        presence_tower=args.presence_tower,
        untagged=args.untagged,
        placebo_names=args.placebo_names,
        mi_needs_entity=args.mi_needs_entity,
    )
