# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Publish: put the model on a hub and deploy the demo
#
# A model hub is a git server: OpenXLab, Hugging Face and ModelScope model repositories are all git
# repositories, with the big files (the weights) stored by **git-lfs**, which keeps only a small pointer
# in git's history and the content on an LFS server. So publishing is: build a folder with the model, a
# model card and a `.gitattributes` that sends the weights to LFS, then `git push`.
#
# Then we package the web demo as an **app** that, on its first start, clones the model from the hub
# and chats with it — the shape OpenXLab apps and Hugging Face Spaces expect.
#
# By default everything goes to a local bare repository in the work directory, so this notebook runs
# offline; set `remote_url` to your hub repository to publish for real.

# %% [markdown]
# ## The course's steps, and where they are here
# | the course (camp2: OpenXLab) | here |
# |---|---|
# | create an empty model repository on OpenXLab; `git lfs install`; `git clone https://code.openxlab.org.cn/USER/REPO.git` | `remote_url = "https://code.openxlab.org.cn/USER/REPO.git"` and a token (below) |
# | copy `/root/ft/final_model`'s files into the clone, `git lfs track "*.bin"`, `git add -A`, `git commit`, `git push` | `build_model_repo` (model card, `.gitattributes`) and **Push**; **What the remote holds** clones it back |
# | an app repository with `app.py` (`git clone` + `git lfs pull` of the model on start), `requirements.txt`, `packages.txt` (`git`, `git-lfs`); OpenXLab → Apps → Streamlit | **The app bundle** (`WORK/publish/app`, its README has the build steps and what to do when a build hangs); `app_remote_url` pushes it |
# | write up the homework | **The homework report** at the end, with your own **What I learned** |
#
# What differs, and why: the weights are `safetensors` sent to LFS by the `.gitattributes` written for you; the token
# never enters a file; the push is read back before it is reported; and a push to the default local repository is
# practice, named so everywhere, not a publication.

# %% tags=["parameters"]
work_dir = None                 # the run's work directory (None: ./work)
model_name = "xiaoming-assistant"  # the model's name on its card
### BEGIN SOLUTION
remote_url = None               # your model repo's git URL, e.g. https://code.openxlab.org.cn/USER/REPO.git (None: local bare repo)
### END SOLUTION
branch = "main"                 # the branch to push to
license = "apache-2.0"          # the card's license
base_model_id = None            # the card's base_model (None: what notebook 00 recorded)
verify = True                   # clone the pushed repo back and compare every file (downloads it once more)
hub_repo_id = None              # "USER/NAME": also upload through huggingface_hub's API (needs network)
hub_endpoint = None             # another Hugging Face-compatible hub's URL (None: huggingface.co)
app_title = "我的小助手"          # the app's title
app_remote_url = None           # git URL of a Space / OpenXLab app repo to push the app to (None: do not push)
app_device = "cpu"              # the app's hardware: "cpu" (pins the CPU build of torch: small, quick) or "cuda"
allow_unverified = False        # publish a final_model whose merge check (notebook 03) is missing or out of date
adapter_dir = None              # the XTuner adapter notebook 03 merged, if any: its pth_to_hf folder or iter_N.pth (None: notebook 02's)

# %% [markdown]
# ## Making the repository and the token (once, on the hub's website)
# **OpenXLab** (openxlab.org.cn): log in, *Model Center → Create model*, give it a name, and create it empty.
# Its page shows the git URL to clone, in two forms: HTTPS, `https://code.openxlab.org.cn/USER/MODEL.git`, and
# SSH, `git@code.openxlab.org.cn:USER/MODEL.git`. For HTTPS you need an access token: *Account settings →
# Key management / Git access tokens → new token* with write permission. **Hugging Face**: *New model*
# (huggingface.co/new), then *Settings → Access Tokens → New token* of type *write*; the URLs are
# `https://huggingface.co/USER/MODEL` and `git@hf.co:USER/MODEL`.
#
# - **HTTPS + token**: put the token in the environment before starting JupyterLab or the run
#   (`export COURSE_HUB_TOKEN=...`; `COURSE_HUB_USER` if the hub wants a user name), or type it into the hidden
#   prompt this notebook shows. It is never written into the notebook or any file.
# - **SSH**: `ssh-keygen -t ed25519`, paste `~/.ssh/id_ed25519.pub` into the hub's *SSH keys* settings, and use
#   the `git@...` URL; no token is needed.
#
# Then set `remote_url` in the parameters above (or `-p remote_url URL` in a headless run). How the kit reaches each form:

# %%
import pandas as pd

from helpers.publish import remote_kind

pd.DataFrame([remote_kind(u) for u in ("https://code.openxlab.org.cn/USER/MODEL.git", "git@code.openxlab.org.cn:USER/MODEL.git",
                                       "https://huggingface.co/USER/MODEL", "file:///path/to/remote.git")])

# %%
import helpers
from helpers.publish import (build_app_bundle, build_model_repo, default_remote, file_table, hub_token,
                             lfs_files, push_model_repo, repo_files)
from helpers.xtuner import import_adapter

work = helpers.work(work_dir)
import_adapter(work, adapter_dir)  # an XTuner adapter given here is WORK/adapter, as in notebook 03
repo = build_model_repo(work, model_name, license=license, base_model=base_model_id, repo_url=remote_url,
                        allow_unverified=allow_unverified)
files = repo_files(repo)  # path, size, sha256, in LFS or not
file_table(files)

# %% [markdown]
# ## The model card
# `README.md` is the repository's front page. It starts with a YAML block of metadata the hubs read
# (license, base model, library, task, language, tags), shown here as the first table; the text below comes
# from the results of the earlier notebooks: the data, the hyper-parameters, the loss curve and the
# before/after answers.

# %%
from helpers.publish import card_for_display

card_for_display(repo)

# %% [markdown]
# ## Which files go to LFS
# `.gitattributes` routes every file matching a pattern through the LFS filter: git keeps a ~130-byte
# pointer, the LFS server keeps the content. Hubs refuse large or binary files pushed as plain git.

# %%
# NBVAL_CHECK_OUTPUT
print((repo / ".gitattributes").read_text())

# %% [markdown]
# ## Push
# The token is read from the `COURSE_HUB_TOKEN` environment variable (or asked for with a hidden prompt
# in JupyterLab). It is handed to git by a credential helper at run time, so it never appears in this
# notebook, in `.git/config` or in any file. A local target needs no token.
#
# The push sends the LFS objects first, then the commit, and reads the remote's branch back: only then
# is it reported as pushed. Running it again sends only what changed; an interrupted push is finished
# by running the cell again. When the push cannot run here (no git-lfs, no token, an unreachable hub), the
# cell says why and the rest of the notebook (the app bundle) is still built.

# %%
from helpers.publish import PublishError

target_url = remote_url or default_remote(work)  # the publish target
try:
    token = hub_token(target_url)
    push = push_model_repo(work, target_url, token=token, branch=branch)
    print(f"pushed commit {push.commit} to {push.remote} ({push.branch})")
    print(f"sent: {push.commits_sent} commit(s), {push.git_objects_sent} git objects, "
          f"{len(push.lfs_objects_sent)} LFS object(s)")
except PublishError as e:
    push, token, not_pushed = None, None, str(e)
    print(f"NOT pushed: {not_pushed}\nThe model repository above and the app bundle below are built all the same.")

# %% [markdown]
# ## What the remote holds
# A fresh clone of the remote, weights included, compared file by file with what we built; and a check
# of git's history: the weights must be LFS pointers there, never plain blobs.

# %%
import pandas as pd

verified = None
if verify and push:
    from helpers.publish import verify_push

    verified = verify_push(repo, target_url, token=token, branch=branch)
    display(pd.Series(verified, name="verification").to_frame())
pd.DataFrame(lfs_files(repo) if push else [])

# %% [markdown]
# ## Alternative: upload through huggingface_hub
# For Hugging Face (or a hub that speaks its API), `create_repo` + `upload_folder` do the same without
# git: set `hub_repo_id` (and `hub_endpoint` for another hub). The token comes from the same variable.

# %%
hub_upload = None
if hub_repo_id:
    from helpers.publish import upload_to_hub

    hub_upload = upload_to_hub(repo, hub_repo_id, token=hub_token(hub_endpoint or "https://huggingface.co"),
                               endpoint=hub_endpoint)
print(hub_upload or "huggingface_hub upload: not asked for (hub_repo_id is None)")

# %% [markdown]
# ## The app bundle
# `WORK/publish/app` is a complete Streamlit app: `app.py` fetches the model from `target_url` with
# git-lfs into a cache folder on first start and then serves the chat demo of notebook 04;
# `requirements.txt` pins the Python packages, `packages.txt` asks the platform for git and git-lfs.
# Its README has the deploy steps for OpenXLab apps and Hugging Face Spaces.

# %%
# NBVAL_CHECK_OUTPUT
app = build_app_bundle(work, target_url, title=app_title, device=app_device, allow_unverified=allow_unverified)
print("\n".join(sorted(p.name for p in app.iterdir() if p.name != ".git")))
print("---- packages.txt\n" + (app / "packages.txt").read_text())

# %%
from helpers.publish import push_folder

app_push = None
if app_remote_url:
    app_push = push_folder(app, app_remote_url, token=hub_token(app_remote_url), branch=branch,
                           message="Deploy the chat demo")
print(f"app pushed: {app_push.commit} to {app_push.remote}" if app_push else "app push: not asked for")

# %% [markdown]
# ## What I learned (your part of the report)
# The report ends with a section you write yourself: a few sentences on what worked, what surprised you, and what you
# would do differently. Write them here, in your own words, as one text (`"\n\n"` in it starts a new paragraph).

# %%
### BEGIN SOLUTION
what_i_learned = (  # a few sentences of your own for the report: what worked, what surprised you, what you would change
    "LoRA trains two thin matrices beside each layer: the adapter is a few MB, and merged it is a plain model again.\n\n"
    "Trained on its identity alone, the contrast answered every question with it (a 复读机); mixing general chat into "
    "the data kept the other answers.\n\n"
    "A merge is checked before it replaces anything, and a push to a folder on my own machine is practice, not a "
    "publication."
)
### END SOLUTION

# %%
from helpers.fingerprint import current_sources
from helpers.results import save_results

save_results(work, "06_publish", {
    **(push.to_dict() if push else {}), "push": push.to_dict() if push else {"pushed": False, "reason": not_pushed},
    "model_repo": str(repo), "files": files,
    "lfs_objects": lfs_files(repo) if push else [], "verified": verified, "hub_upload": hub_upload, "app": str(app),
    "app_files": sorted(p.name for p in app.iterdir() if p.name != ".git"),
    "app_push": app_push.to_dict() if app_push else None,
    "practice_remote": bool(push) and remote_kind(push.remote)["transport"] == "local",  # a local push: not published
    "what_i_learned": what_i_learned,
    "sources": current_sources(work, ("final_model",))});

# %% [markdown]
# ## The homework report
# One page to hand in, in the course's order: who the assistant is and what made it, the identity arriving, the loss,
# the chats (before/after, notebook, terminal, web demo), the over-fitting check beside the contrast, the merge, the
# pictures, where the model went and what you learned; the bookkeeping (versions, hashes, settings) is folded away at
# the end. `index.html` is the page (images inside it; Chinese and emoji drawn with the fonts it names), `index.md` its
# Markdown twin. A headless run (`python -m helpers run`) builds it too, and `python -m helpers report WORK` again.

# %%
from helpers.report import build_report

report = build_report(work.root)
print(f"report: {report}\n        {report.with_name('index.md')}")

# %% [markdown]
# To try the app here: `cd WORK/publish/app && streamlit run app.py`.
