"""Daemon commands: `serve`, `detector-sim`, `listen`, `demo` (see docs/DAEMON.md)."""

from __future__ import annotations

import logging
import signal
import sys
import time
import uuid

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

    import zmq

    try:
        return Service(config, reload_config=reread).run()
    except zmq.ZMQError as exc:  # a bind or connect refused at start-up: the user's endpoints
        raise ValueError(
            f"cannot open the daemon's sockets: {exc.strerror} (frames: {config.ingest.mode} {config.ingest.address}; "
            f"predictions: {config.publish.mode} {config.publish.address}); if another daemon holds the port, stop "
            f"it or give free endpoints with --ingest / --publish or the config file"
        ) from None


def _detector_sim(args) -> int:
    import zmq

    from xtalsym.daemon.sim import DetectorGeometry, DetectorSim, eiger2_geometry, eiger2_layout, push_socket
    from xtalsym.offline import simulate, structures

    sources = args.structures or [str(structures.shipped_structures_dir())]
    layout = None
    if args.layout:
        if args.pixels or args.pixel_size_m:
            raise ValueError(f"--layout {args.layout} sets the pixels and pixel size; drop --pixels / --pixel-size-m")
        layout = eiger2_layout(args.layout, seed=args.seed)
        geometry = eiger2_geometry(args.layout, distance_m=args.distance_m, wavelength_m=args.wavelength_m)
        if args.beam_center:
            geometry = DetectorGeometry(**{**geometry.__dict__, "beam_center_x_px": args.beam_center[0],
                                           "beam_center_y_px": args.beam_center[1]})
    else:
        pixels = args.pixels or [512]
        geometry = DetectorGeometry(pixels_x=pixels[0], pixels_y=pixels[-1], pixel_size_m=args.pixel_size_m or 75e-6,
                                    distance_m=0.3 if args.distance_m is None else args.distance_m,
                                    wavelength_m=args.wavelength_m,
                                    beam_center_x_px=args.beam_center[0] if args.beam_center else None,
                                    beam_center_y_px=args.beam_center[1] if args.beam_center else None)
    realism = None
    if args.dose or args.background or args.misorientation_deg or args.beam_stop_px:
        realism = simulate.Realism(dose=args.dose, background=args.background, seed=args.seed,
                                   misorientation_deg=args.misorientation_deg, beam_stop_radius_px=args.beam_stop_px)
    sim = DetectorSim(sources, geometry=geometry, realism=realism, protocol=args.protocol,
                      axis_order=args.axis_order, repeat=args.repeat, series_id=args.series_id,
                      bad_every=args.bad_every, gap_rows=tuple(args.gap_rows) if args.gap_rows else None,
                      user_data=not args.no_user_data, distance_field=args.distance_field,
                      odd_mask_encoding=args.odd_mask_encoding, start_with_first_image=args.start_with_first_image,
                      unique_id=args.series_unique_id, duplicate_end=args.duplicate_end,
                      layout=layout, cache_dir=args.cache_dir)
    ctx = zmq.Context.instance()
    try:
        sock = push_socket(ctx, args.address, bind=not args.connect)
    except zmq.ZMQError as exc:
        fix = ("give tcp://HOST:PORT" if exc.errno == zmq.EINVAL
               else "another detector-sim or detector may hold it: stop it or pass another --address")
        raise ValueError(f"--address {args.address}: cannot {'connect to' if args.connect else 'bind'} it "
                         f"({exc.strerror}); {fix}") from None
    print(f"detector-sim: {len(sim.samples)} structures x {args.repeat} -> {sim.number_of_images()} images, "
          f"{args.series_count} series, {args.protocol}, PUSH {'connect' if args.connect else 'bind'} {args.address}",
          file=sys.stderr)
    t0 = time.perf_counter()
    n = 0
    for k in range(args.series_count):  # the same frames again as series id + k (same unique id if given)
        sim.series_id = args.series_id + k
        if k and not args.series_unique_id:
            sim.series_unique_id = uuid.uuid4().hex
        n += sim.send(sock, rate_hz=args.rate)
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


ENDPOINT_HELP = "a ZeroMQ endpoint, tcp://HOST:PORT (ipc://PATH also works)"
PROTOCOL_HELP = ("detector stream: stream_v2 (DECTRIS SIMPLON Stream V2, CBOR), stream_v1 (legacy JSON "
                 "multipart), native (xtalsym's own) (default %(default)s)")


def register(commands) -> None:
    from xtalsym.daemon.endpoints import DEFAULT_INGEST_ADDRESS, DEFAULT_PUBLISH_ADDRESS, DEFAULT_TOPIC

    p = commands.add_parser("serve", help="run the daemon: detector frames in, predictions out",
                            description="Classify detector frames as they stream in (docs/DAEMON.md).")
    p.add_argument("--config", help="TOML configuration (default: documented defaults and the shipped bundle)")
    p.add_argument("--bundle", metavar="DIR", help="bundle directory (overrides bundle.path)")
    p.add_argument("--ingest", metavar="ENDPOINT", help=f"where frames come from, {ENDPOINT_HELP}; the daemon "
                   f"connects to a detector's PUSH (overrides ingest.address, default {DEFAULT_INGEST_ADDRESS})")
    p.add_argument("--publish", metavar="ENDPOINT", help=f"where predictions go (PUB, bound), {ENDPOINT_HELP} "
                   f"(overrides publish.address, default {DEFAULT_PUBLISH_ADDRESS})")
    p.add_argument("--metrics-port", type=int, help="HTTP port of /metrics, /healthz, /readyz (overrides "
                   "metrics.port; 0 = any free port)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.set_defaults(handler=_serve)

    p = commands.add_parser("detector-sim", help="stream simulated frames as a detector would",
                            description="PUSH simulated zone-axis frames (truth in user_data).")
    p.add_argument("structures", nargs="*", help="structure files (CIF, POSCAR, ...) or folders (default: the shipped structures)")
    p.add_argument("--address", default=DEFAULT_INGEST_ADDRESS, metavar="ENDPOINT",
                   help=f"{ENDPOINT_HELP} to bind (a detector binds; default %(default)s)")
    p.add_argument("--connect", action="store_true", help="connect to --address instead of binding it")
    p.add_argument("--protocol", default="stream_v2", choices=("stream_v2", "stream_v1", "native"), help=PROTOCOL_HELP)
    p.add_argument("--rate", type=float, default=0.0, help="images per second (0 = as fast as accepted)")
    p.add_argument("--repeat", type=int, default=1, help="send every structure this many times")
    p.add_argument("--axis-order", default="xyz", help="order of the zone axes of each sample (default %(default)s)")
    p.add_argument("--pixels", type=int, nargs="+", metavar="N", help="N or NX NY (default 512)")
    p.add_argument("--pixel-size-m", type=float, help="pixel edge in metres (default 75e-6)")
    p.add_argument("--distance-m", type=float, help="sample-to-detector distance in metres: default 0.3, or the layout's (3.0 m for a 4M, 6.0 m for a 16M)")
    p.add_argument("--layout", choices=("eiger2-500k", "eiger2-1m", "eiger2-4m", "eiger2-9m", "eiger2-16m"),
                   help="an EIGER2 face: its size, module gaps and dead/noisy pixels (in the frames and the "
                        "pixel mask); calibration.method = \"auto\" (the default) picks area for 4M and 16M")
    p.add_argument("--cache-dir", help="keep rendered frames here (a 16M frame takes ~1 min per axis to render)")
    p.add_argument("--wavelength-m", type=float, default=3.5e-12, help="wavelength in metres (default %(default)s)")
    p.add_argument("--beam-center", type=float, nargs=2, metavar=("X", "Y"),
                   help="beam position in pixels from the first pixel's centre (default: the detector's centre)")
    p.add_argument("--dose", type=float, default=None,
                   help="Poisson noise: expected counts at the brightest noise-free pixel (default: no noise)")
    p.add_argument("--background", type=float, default=0.0,
                   help="constant diffuse background, as a fraction of the brightest noise-free pixel "
                        "(e.g. 0.01; default 0)")
    p.add_argument("--misorientation-deg", type=float, default=0.0,
                   help="crystal tilt off the zone axis: random axis, angle ~ N(0, this) degrees (default 0)")
    p.add_argument("--beam-stop-px", type=float, default=0.0,
                   help="radius in pixels of a beam stop that zeroes the centre (default 0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise, tilts and layout defects (default 0)")
    p.add_argument("--gap-rows", type=int, nargs=2, metavar=("START", "STOP"),
                   help="rows [START, STOP) dead (65535) and masked, like an EIGER's module gap")
    p.add_argument("--bad-every", type=int, default=0, help="insert an undecodable message every N images")
    p.add_argument("--series-id", type=int, default=1, help="series id of the stream (default %(default)s)")
    p.add_argument("--series-count", type=int, default=1, help="send the series this many times (series ids "
                   "--series-id, +1, ...)")
    g = p.add_argument_group("behaviours seen from real streams (each reproduced on request)")
    g.add_argument("--no-user-data", action="store_true", help="images without user_data (no axis, no sample id)")
    g.add_argument("--distance-field", default="distance", choices=("distance", "translation",
                   "negative_translation", "none"), help="how the start gives the detector distance: "
                   "detector_distance, only detector_translation [0, 0, +D] or [0, 0, -D], or not at all "
                   "(stream V1: distance or none)")
    g.add_argument("--odd-mask-encoding", action="store_true", help="the start's pixel mask and flatfield in an "
                   "encoding the spec does not use (V2: raw bytes, not tagged arrays; V1: htypes pixelmask-1.0 / "
                   "flatfield-1.0)")
    g.add_argument("--start-with-first-image", action="store_true", help="send the start and image 0 as one "
                   "ZeroMQ message")
    g.add_argument("--series-unique-id", help="send this series_unique_id (with --series-count: reused by every "
                   "series)")
    g.add_argument("--duplicate-end", action="store_true", help="send every end message twice")
    p.add_argument("--linger", type=float, default=10.0, help="seconds to wait for queued messages at exit")
    p.set_defaults(handler=_detector_sim)

    p = commands.add_parser("listen", help="subscribe to predictions and print them against the truth")
    p.add_argument("--address", default=DEFAULT_PUBLISH_ADDRESS, metavar="ENDPOINT",
                   help=f"the daemon's publish endpoint, {ENDPOINT_HELP} (default %(default)s)")
    p.add_argument("--topic", default=DEFAULT_TOPIC, help="prediction topic (default %(default)s)")
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
    p.add_argument("structures", nargs="*", help="structure files (CIF, POSCAR, ...) or folders (default: the shipped structures)")
    p.add_argument("--bundle", metavar="DIR", help="bundle directory (default: the shipped one)")
    p.add_argument("--rate", type=float, default=20.0, help="images per second (default %(default)s)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--protocol", default="stream_v2", choices=("stream_v2", "stream_v1", "native"), help=PROTOCOL_HELP)
    p.add_argument("--timeout", type=float, default=120.0, help="give up after S seconds (default %(default)s)")
    p.set_defaults(handler=_demo)


def _demo(args) -> int:
    from xtalsym.daemon.demo import run_demo

    summary = run_demo(args.structures, bundle=args.bundle, rate_hz=args.rate, repeat=args.repeat,
                       protocol=args.protocol, timeout_s=args.timeout, echo=print)
    print(summary.table())
    return 0 if summary.final else 1
