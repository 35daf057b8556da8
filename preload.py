"""Command-line flags of the DreamBooth extension; the webui calls preload(parser) before parsing its arguments."""


def preload(parser):
    parser.add_argument("--dreambooth-dir", type=str, default=None,
                        help="DreamBooth data folder (holds models/dreambooth and models/Stable-diffusion); "
                             "default: the webui's own models folder")
