"""
The evaluation downloads for eval.py (needs a network once; everything after is offline):

  eval_bundle/      the DCLM eval bundle as nanochat fetches it: core.yaml (the CORE tasks),
                    eval_meta_data.csv (their random baselines), eval_data/ (the tasks, JSONL)
  wikitext-2/       WikiText-2 (Merity et al. 2016, arXiv 1609.07843), the tokenized v1 text
                    the FLT paper's perplexity is measured on: wiki.test.tokens

    python data/eval/prepare.py                  # both, into data/eval/
    python data/eval/prepare.py --what=core      # only the bundle (or --what=wikitext2)

Each archive is downloaded to a temporary file, unpacked into a temporary folder and moved
into place, so an interrupted download never leaves a half folder behind.
"""

import os
import shutil
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from data.common import ArgumentParser, download, out_folder  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
WIKITEXT_URL = "https://wikitext.smerity.com/wikitext-2-v1.zip"
# what each download must contain once unpacked: (folder in out_dir, the files that prove it complete)
EXPECTED = {"core": ("eval_bundle", ("core.yaml", "eval_meta_data.csv", "eval_data")),
            "wikitext2": ("wikitext-2", ("wiki.test.tokens",))}


def unpack(zip_path, folder, out_dir):
    """Unzip zip_path and move its `folder` (found at any depth) to out_dir/folder."""
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        try:
            with zipfile.ZipFile(zip_path) as z:
                for name in z.namelist():  # never write outside tmp
                    if os.path.isabs(name) or ".." in name.split("/"):
                        raise SystemExit(f"error: {zip_path} holds an unsafe path {name!r}; not unpacking it")
                z.extractall(tmp)
        except zipfile.BadZipFile as e:
            raise SystemExit(f"error: {zip_path} is not a valid zip ({e}); delete it and run this again") from None
        found = [os.path.join(d, folder) for d, subdirs, _ in os.walk(tmp) if folder in subdirs]
        if not found:
            raise SystemExit(f"error: {zip_path} has no folder {folder}/; delete it and run this again")
        dest = os.path.join(out_dir, folder)
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.replace(found[0], dest)


def prepare(what=("core", "wikitext2"), out_dir=HERE, bundle_url=BUNDLE_URL, wikitext_url=WIKITEXT_URL):
    out_folder(out_dir)
    for name in what:
        folder, needed = EXPECTED[name]
        if all(os.path.exists(os.path.join(out_dir, folder, n)) for n in needed):
            print(f"{name}: already in {os.path.join(out_dir, folder)}")
            continue
        url = bundle_url if name == "core" else wikitext_url
        zip_path = download(url, os.path.join(out_dir, os.path.basename(url)))
        unpack(zip_path, folder, out_dir)
        missing = [n for n in needed if not os.path.exists(os.path.join(out_dir, folder, n))]
        if missing:
            raise SystemExit(f"error: {url} unpacked without {', '.join(missing)}; is it the right archive?")
        os.remove(zip_path)
        print(f"{name}: ready in {os.path.join(out_dir, folder)}")


if __name__ == "__main__":
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", default="core,wikitext2", help="comma-separated: core, wikitext2")
    parser.add_argument("--out_dir", default=HERE)
    parser.add_argument("--bundle_url", default=BUNDLE_URL)
    parser.add_argument("--wikitext_url", default=WIKITEXT_URL)
    a = parser.parse_args()
    what = [w.strip() for w in a.what.split(",") if w.strip()]
    bad = [w for w in what if w not in EXPECTED]
    if bad or not what:
        raise SystemExit(f"error: --what={a.what}: valid: {', '.join(EXPECTED)}")
    prepare(what, a.out_dir, a.bundle_url, a.wikitext_url)
