"""`sane-hf embed` and `sane-hf predict`: a pretrained SANE applied to the user's own networks."""

from __future__ import annotations

from sane_hf.cli.common import add_device_argument, check_sources, device_argument

NETWORKS_HELP = (
    "networks: .safetensors files, folders of them, raw zoo folders, zoo dataset folders or Hub "
    "ids (all must have the model's zoo architecture)"
)


def register(subparsers) -> None:
    """Add ``embed`` and ``predict`` to the `sane-hf` parser."""
    embed = subparsers.add_parser(
        "embed",
        help="embed networks with a pretrained SANE (one row per network)",
        description="Embed networks with a pretrained SANE and its processor. Writes Parquet "
        "(id, embedding[, layer_means]) or .npy (mean embeddings only).",
    )
    embed.add_argument("model", help="SANE model folder or Hub id (with its processor)")
    embed.add_argument("networks", nargs="+", help=NETWORKS_HELP)
    embed.add_argument("--output", required=True, help="embeddings.parquet (default) or .npy")
    embed.add_argument(
        "--layer-means", action="store_true", help="also write the per-layer mean latents"
    )
    _add_run_arguments(embed)
    embed.set_defaults(func=_run_embed)

    predict = subparsers.add_parser(
        "predict",
        help="predict properties (test accuracy, ...) of networks with the model's probe heads",
    )
    predict.add_argument("model", help="SANE model folder or Hub id (with processor + probe heads)")
    predict.add_argument("networks", nargs="+", help=NETWORKS_HELP)
    predict.add_argument("--output", help="also write the table as .json or .csv")
    predict.add_argument("--property", action="append", help="only this property (repeatable)")
    _add_run_arguments(predict)
    predict.set_defaults(func=_run_predict)


def _add_run_arguments(parser) -> None:
    parser.add_argument("--batch-size", type=int, default=256, help="windows per forward pass")
    add_device_argument(parser)


def _run_embed(args) -> int:
    from sane_hf.downstream.pretrained import embed_networks
    from sane_hf.zoo.distributed import is_main_process

    check_sources({"model": args.model, "networks": args.networks})
    embeddings = embed_networks(
        args.model,
        args.networks,
        output=args.output,
        layer_means=args.layer_means,
        batch_size=args.batch_size,
        device=device_argument(args),
    )
    count, dim = embeddings.mean.reshape(-1, embeddings.mean.shape[-1]).shape
    if is_main_process():  # under a launcher every process holds the gathered result
        print(f"embedded {count} networks ({dim}-dim) into {args.output}")
        outside = embeddings.extras.get("outside_zoo_range")
        if outside is not None and outside.any():
            print(
                f"warning: {int(outside.sum())} of {count} networks lie outside the range of the "
                "zoo's validation networks (see the outside_zoo_range and *_percentile columns)"
            )
    return 0


def _run_predict(args) -> int:
    from sane_hf.downstream.pretrained import predict_networks
    from sane_hf.zoo.distributed import is_main_process

    check_sources({"model": args.model, "networks": args.networks})
    predictions = predict_networks(
        args.model,
        args.networks,
        output=args.output,
        properties=args.property,
        batch_size=args.batch_size,
        device=device_argument(args),
    )
    if is_main_process():
        print(predictions.table())
    return 0
