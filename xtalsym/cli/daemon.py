"""Daemon commands: `serve`, `detector-sim`, `listen`, `demo` (see docs/DAEMON.md)."""

from __future__ import annotations

import logging
import signal
import sys
import time

log = logging.getLogger(__name__)


def _serve(args) -> int:
    from xtalsym.daemon.config import load_config
    from xtalsym.daemon.service import Service

    overrides: dict = {}
    if args.bundle:
        overrides.setdefault("bundle", {})["path"] = args.bundle
    if args.ingest:
        overrides.setdefault("ingest", {})["address"] = args.ingest
    if args.publish:
        overrides.setdefault("publish", {})["address"] = args.publish
    if args.metrics_port is not None:
        overrides.setdefault("metrics", {})["port"] = args.metrics_port
    config = load_config(args.config, overrides=overrides)
    if args.print_config:
        print(config.to_toml(), end="")
        return 0
    log.info("configuration:\n%s", config.to_toml())

    def reread():  # SIGHUP: the same file and command-line overrides, read afresh
        fresh = load_config(args.config, overrides=overrides)
        log.info("reload: configuration:\n%s", fresh.to_toml())
        return fresh

    return Service(config, reload_config=reread).run()


def _detector_sim(args) -> int:
    import zmq

    from xtalsym.daemon.sim import DetectorGeometry, DetectorSim, push_socket
    from xtalsym.offline import simulate, structures

    sources = args.structures or [str(structures.shipped_structures_dir())]
    geometry = DetectorGeometry(pixels_x=args.pixels[0], pixels_y=args.pixels[-1], pixel_size_m=args.pixel_size_m,
                                distance_m=args.distance_m, wavelength_m=args.wavelength_m,
                                beam_center_x_px=args.beam_center[0] if args.beam_center else None,
                                beam_center_y_px=args.beam_center[1] if args.beam_center else None)
    realism = None
    if args.dose or args.background or args.misorientation_deg or args.beam_stop_px:
        realism = simulate.Realism(dose=args.dose, background=args.background, seed=args.seed,
                                   misorientation_deg=args.misorientation_deg, beam_stop_radius_px=args.beam_stop_px)
    sim = DetectorSim(sources, geometry=geometry, realism=realism, protocol=args.protocol,
                      axis_order=args.axis_order, repeat=args.repeat, series_id=args.series_id,
                      bad_every=args.bad_every, gap_rows=tuple(args.gap_rows) if args.gap_rows else None)
    ctx = zmq.Context.instance()
    sock = push_socket(ctx, args.address, bind=not args.connect)
    print(f"detector-sim: {len(sim.samples)} structures x {args.repeat} -> {sim.number_of_images()} images, "
          f"{args.protocol}, PUSH {'connect' if args.connect else 'bind'} {args.address}", file=sys.stderr)
    t0 = time.perf_counter()
    n = sim.send(sock, rate_hz=args.rate)
    sock.close(linger=int(args.linger * 1000))
    print(f"detector-sim: sent {n} messages in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return 0


def _listen(args) -> int:
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    from xtalsym.daemon.client import listen

    summary = listen(args.address, topic=args.topic, count=args.count, final_count=args.samples,
                     duration=args.duration, idle=args.idle, echo=None if args.quiet else print, stop=stop,
                     curve_server_key=args.curve_server_key, curve_key=args.curve_key)
    print(summary.table())
    if summary.missed:
        print(f"missed {summary.missed} predictions (gaps in seq: this subscriber did not keep up)")
    return 0


def register(commands) -> None:
    from xtalsym.daemon.config import DEFAULT_PUBLISH_ADDRESS, DEFAULT_TOPIC
    from xtalsym.daemon.sim import DEFAULT_ADDRESS

    p = commands.add_parser("serve", help="run the daemon: detector frames in, predictions out",
                            description="Classify detector frames as they stream in (docs/DAEMON.md).")
    p.add_argument("--config", help="TOML configuration (default: documented defaults and the shipped bundle)")
    p.add_argument("--bundle", help="bundle directory (overrides bundle.path)")
    p.add_argument("--ingest", help="frame endpoint (overrides ingest.address)")
    p.add_argument("--publish", help="prediction endpoint (overrides publish.address)")
    p.add_argument("--metrics-port", type=int, help="HTTP port of /metrics, /healthz, /readyz (overrides "
                   "metrics.port; 0 = any free port)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.set_defaults(handler=_serve)

    p = commands.add_parser("detector-sim", help="stream simulated frames as a detector would",
                            description="PUSH simulated zone-axis frames (truth in user_data).")
    p.add_argument("structures", nargs="*", help="CIF files or directories (default: the shipped structures)")
    p.add_argument("--address", default=DEFAULT_ADDRESS)
    p.add_argument("--connect", action="store_true", help="connect instead of bind")
    p.add_argument("--protocol", default="stream_v2", choices=("stream_v2", "stream_v1", "native"))
    p.add_argument("--rate", type=float, default=0.0, help="images per second (0 = as fast as accepted)")
    p.add_argument("--repeat", type=int, default=1, help="send every structure this many times")
    p.add_argument("--axis-order", default="xyz")
    p.add_argument("--pixels", type=int, nargs="+", default=[512], metavar="N", help="N or NX NY")
    p.add_argument("--pixel-size-m", type=float, default=75e-6)
    p.add_argument("--distance-m", type=float, default=0.3)
    p.add_argument("--wavelength-m", type=float, default=3.5e-12)
    p.add_argument("--beam-center", type=float, nargs=2, metavar=("X", "Y"))
    p.add_argument("--dose", type=float, default=None, help="Poisson noise: counts at the brightest pixel")
    p.add_argument("--background", type=float, default=0.0)
    p.add_argument("--misorientation-deg", type=float, default=0.0)
    p.add_argument("--beam-stop-px", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gap-rows", type=int, nargs=2, metavar=("START", "STOP"))
    p.add_argument("--bad-every", type=int, default=0, help="insert an undecodable message every N images")
    p.add_argument("--series-id", type=int, default=1)
    p.add_argument("--linger", type=float, default=10.0, help="seconds to wait for queued messages at exit")
    p.set_defaults(handler=_detector_sim)

    p = commands.add_parser("listen", help="subscribe to predictions and print them against the truth")
    p.add_argument("--address", default=DEFAULT_PUBLISH_ADDRESS)
    p.add_argument("--topic", default=DEFAULT_TOPIC)
    p.add_argument("--count", type=int, help="stop after N predictions")
    p.add_argument("--samples", type=int, help="stop after N final predictions")
    p.add_argument("--duration", type=float, help="stop after S seconds")
    p.add_argument("--idle", type=float, help="stop after S seconds without a prediction (once one came)")
    p.add_argument("--quiet", action="store_true", help="only the summary")
    p.add_argument("--curve-server-key", help="CURVE: the daemon's public certificate (publish.curve_secret_key_file's "
                   ".key file)")
    p.add_argument("--curve-key", help="CURVE: this subscriber's secret certificate (.key_secret); its public half "
                   "must be in the daemon's publish.curve_public_keys_dir")
    p.set_defaults(handler=_listen)

    p = commands.add_parser("demo", help="detector-sim -> serve -> listen on loopback, predictions against the truth",
                            description="Start the daemon on a bundle, stream simulated frames of structures into it "
                                        "as a detector would, print every prediction against the truth and a summary, "
                                        "then stop everything cleanly.")
    p.add_argument("structures", nargs="*", help="CIF files or directories (default: the shipped structures)")
    p.add_argument("--bundle", help="bundle directory (default: the shipped one)")
    p.add_argument("--rate", type=float, default=20.0, help="images per second (default %(default)s)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--protocol", default="stream_v2", choices=("stream_v2", "stream_v1", "native"))
    p.add_argument("--timeout", type=float, default=120.0, help="give up after S seconds (default %(default)s)")
    p.set_defaults(handler=_demo)


def _demo(args) -> int:
    from xtalsym.daemon.demo import run_demo

    summary = run_demo(args.structures, bundle=args.bundle, rate_hz=args.rate, repeat=args.repeat,
                       protocol=args.protocol, timeout_s=args.timeout, echo=print)
    print(summary.table())
    return 0 if summary.final else 1
