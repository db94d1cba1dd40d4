"""Git storage: a bare mirror per remote branch, commits without a work tree, batched pushes.

pygit2 is used only inside this package; the rest of the code sees :mod:`.types`.
"""
