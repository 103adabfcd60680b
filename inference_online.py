"""Live portrait animation in the browser: python inference_online.py, then open http://localhost:7860

Upload a reference portrait, press Record in the webcam box (or play a driving video), and the animation plays
beside it. One stream per device at a time (--devices cuda:0,cuda:1 serves two); other visitors wait in line.
Binds 127.0.0.1 unless --host says otherwise. Any config value can follow as key=value. The animation can also
leave the browser: http://localhost:7860/output (the animation alone, for OBS), --virtual-camera, --stream-out URL.
"""

import argparse
import sys

from personalive.cli import add_common_arguments, parse_args, run
from personalive.config import load_config
from personalive.errors import ConfigError
from personalive.pipelines.build import ACCELERATIONS
from personalive.server.app import WEBCAM_FPS, check_address, launch
from personalive.server.outputs import open_outputs
from personalive.server.worker import build_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "configs/prompts/personalive_online.yaml")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the page to the network")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    parser.add_argument("--acceleration", choices=ACCELERATIONS, default="none",
                        help="engine backend; tensorrt/onnxruntime need `python torch2trt.py` first (default: none)")
    parser.add_argument("--devices", help="comma-separated devices, one stream each (default: the config's device)")
    parser.add_argument("--max-streams", type=int, help="streams at once (default and maximum: one per device)")
    parser.add_argument("--max-upload-mb", type=float, default=50, help="largest accepted upload (default: 50)")
    parser.add_argument("--virtual-camera", nargs="?", const="", metavar="NAME",
                        help="also send the animation to a virtual camera (pyvirtualcam; NAME e.g. /dev/video2)")
    parser.add_argument("--stream-out", metavar="URL",
                        help="also stream the animation as H.264 to rtmp://, srt://, rtsp:// or udp:// (MPEG-TS)")
    args = parse_args(parser, argv)
    if args.virtual_camera and "=" in args.virtual_camera:  # `--virtual-camera key=value`: no NAME, an override
        args.overrides.append(args.virtual_camera)
        args.virtual_camera = ""

    def job() -> None:
        cfg = load_config(args.config, args.overrides)
        check_address(args.host, args.port)  # before the models load
        if not args.max_upload_mb > 0:
            raise ConfigError(f"--max-upload-mb {args.max_upload_mb}: must be positive")
        devices = args.devices.split(",") if args.devices else None
        outputs = open_outputs(cfg.width, cfg.height, WEBCAM_FPS, args.virtual_camera, args.stream_out)  # fail early
        try:
            server = build_server(cfg, devices, args.acceleration, args.max_streams)
        except BaseException:
            outputs.close()
            raise
        size = (cfg.reference_image_height, cfg.reference_image_width)
        launch(server, size, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, outputs=outputs)

    return run(job, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
