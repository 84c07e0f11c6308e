"""Sphinx configuration of adamp-xp's documentation site.

Build (strict: warnings are errors, every cross-reference must resolve)::

    python -m sphinx -W --keep-going -n -b html docs docs/_build/html

Sphinx with MyST (pages in Markdown, which GitHub also renders) and the PyData theme, as NumPy, JAX/optax
and the array API standard's own documentation are built; autodoc + napoleon read the Google-style
docstrings of the four import packages, and MathJax renders their maths from a copy bundled by the
``sphinx-mathjax-offline`` package (no network needed to read the pages, nor to build them).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from pathlib import Path

from sphinx.util.nodes import make_refnode

ROOT = Path(__file__).resolve().parents[1]
# An editable install puts the packages on sys.path; a plain checkout works too.
for path in (ROOT, ROOT / "adapters"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
os.environ.setdefault("TQDM_DISABLE", "1")

project = "adamp-xp"
author = "adamp-xp contributors"
copyright = "2025, adamp-xp contributors"  # noqa: A001
release = "0.1.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 copied into _static: the maths renders offline
    "sphinx_copybutton",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath", "deflist"]
myst_heading_anchors = 3  # README-style [text](#a-heading) links inside a page
# \texttt{wd\_ratio} and \text{...} in the docstrings' maths need MathJax's text-mode macros.
mathjax3_config = {"loader": {"load": ["[tex]/textmacros"]}, "tex": {"packages": {"[+]": ["textmacros"]}}}
suppress_warnings = ["myst.header"]  # docs/architecture.md is kept as written (its headings start at ##)

autodoc_default_options = {"members": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"  # types only where the docstring describes the name
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Nitpicky (-n): every reference to this project's objects must resolve. Names from other libraries
# (torch, jax, optax, numpy, the standard library's typing) are not documented here: no intersphinx, as the
# build runs without network.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|jax|jaxlib|optax|numpy|np|cupy|flax|numba|triton|array_api_compat|array_api_strict)(\..*)?"),
    (r"py:.*", r"(typing|collections|collections\.abc|abc|types|enum|dataclasses|contextlib)\..*"),
    (r"py:.*", r"(Any|Callable|Iterable|Iterator|Mapping|MutableMapping|Sequence|Hashable|NamedTuple|Protocol)"),
    (r"py:.*", r"(Array|ArrayLike|Tensor|PyTree|Params|ndarray|DTensor|Optimizer|GradientTransformation)"),
    (r"py:.*", r"(int|float|bool|str|bytes|dict|list|tuple|set|object|type|None|complex|slice|Ellipsis)"),
    (r"py:.*", r"(ValueError|TypeError|RuntimeError|Exception|UserWarning)"),
    (r"py:.*", r".*\._[a-z].*"),  # private helpers a docstring names for maintainers
]

OUR_PACKAGES = ("adamp_core", "adamp_torch", "adamp_array", "adamp_optax", "adamp_xp")


def _exists(dotted: str) -> bool:
    """Whether ``dotted`` names a module or an attribute of one (``adamp_core.fused.OK``)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def resolve_python_reference(app, env, node, contnode):
    """Docstrings name objects the way their module sees them: ``RowReduce`` in ``adamp_core.projection``,
    ``adamp_core.all_finite`` (re-exported), a module constant such as ``GROUP_MAX_ELEMENTS``. A reference
    that Sphinx cannot resolve goes to the one documented object whose full name ends with it; one that
    names no documented object but exists in the code (an undocumented constant, a private helper) is shown
    as code. Anything else (a name that exists nowhere: a stale reference after a rename) stays a warning,
    which ``-W`` makes an error."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    domain = env.get_domain("py")
    matches = [name for name in domain.objects if name == target or name.endswith("." + target)]
    if len(matches) == 1:
        name = matches[0]
        obj = domain.objects[name]
        return make_refnode(app.builder, node["refdoc"], obj.docname, obj.node_id, contnode, name)
    module, cls = node.get("py:module") or "", node.get("py:class") or ""
    candidates = [target] + [f"{module}.{target}"] * bool(module) + [f"{module}.{cls}.{target}"] * bool(cls)
    candidates += [f"{m}.{target}" for m in {n.rsplit(".", 1)[0] for n in domain.objects} if module]
    if any(c.split(".")[0] in OUR_PACKAGES and _exists(c) for c in candidates):
        return contnode
    return None


def prose_property_summaries(app, what, name, obj, options, lines):
    """napoleon reads a property docstring's "Some words: more words" as "type: description"; put the
    words back where they were when they are prose, not a type."""
    if what not in ("property", "attribute"):
        return
    for i, line in enumerate(lines):
        if line.startswith(":type: ") and " " in line[7:].strip() and not any(c in line for c in "[]|,."):
            words = line[7:].strip()
            del lines[i]
            for j, text in enumerate(lines):
                if text.strip():
                    lines[j] = f"{words}: {text}"
                    break
            return


INTERNALS_MARK = "<!-- the modules: written by docs/conf.py at build time -->"
PUBLIC_PAGE_MODULES = {"adamp_core", "adamp_core.tree", "adamp_core.diagnostics"}  # api/adamp_core.md


def core_internals(app, docname, source):
    """api/core_internals.md lists every public module of adamp_core found at build time (a module that is
    added, moved or renamed needs no edit here), each without the names that adamp_core re-exports (those
    are on api/adamp_core.md)."""
    if docname != "api/core_internals" or INTERNALS_MARK not in source[0]:
        return
    import adamp_core

    exported = set(adamp_core.__all__)
    sections = []
    for info in pkgutil.walk_packages(adamp_core.__path__, "adamp_core."):
        name = info.name
        if name in PUBLIC_PAGE_MODULES or any(part.startswith("_") for part in name.split(".")):
            continue
        module = importlib.import_module(name)
        excluded = sorted(exported & set(getattr(module, "__all__", ())))
        options = "   :members:\n" + (f"   :exclude-members: {', '.join(excluded)}\n" if excluded else "")
        sections.append(f"## {name}\n\n```{{eval-rst}}\n.. automodule:: {name}\n{options}```\n")
    source[0] = source[0].replace(INTERNALS_MARK, "\n".join(sections))


def drop_namedtuple_aliases(app, what, name, obj, options, lines):
    """A NamedTuple field's generated docstring ("Alias for field number 0") says nothing to a reader."""
    if len(lines) == 1 and lines[0].startswith("Alias for field number"):
        lines.clear()


def setup(app):
    app.connect("source-read", core_internals)
    app.connect("autodoc-process-docstring", drop_namedtuple_aliases)
    app.connect("missing-reference", resolve_python_reference)
    app.connect("autodoc-process-docstring", prose_property_summaries, priority=600)


html_theme = "pydata_sphinx_theme"
html_title = "adamp-xp"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "navbar_align": "left",
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_sidebars = {"**": ["sidebar-nav-bs"]}
html_show_sourcelink = False
html_copy_source = False
