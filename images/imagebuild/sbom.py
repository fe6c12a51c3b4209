"""An SPDX 2.3 software bill of materials per image and architecture."""

from __future__ import annotations

import datetime as dt
import re
import uuid

from imagebuild.layers import Stage
from imagebuild.oci import ref
from imagebuild.project import (
    Project,
)


def spdx(p: Project, image: str, arch: str, stages: dict[str, Stage]) -> dict[str, object]:
    """SPDX 2.3 JSON from the Debian control fields and the pip dist-info metadata."""
    name = f"{ref(image, p.version)} ({arch})"
    pkgs: list[dict[str, object]] = []
    rels = []

    def add(spdx_id: str, pkg: dict[str, object]) -> None:
        pkgs.append({"SPDXID": spdx_id, "downloadLocation": "NOASSERTION",
                     "filesAnalyzed": False, "copyrightText": "NOASSERTION", **pkg})
        rels.append({"spdxElementId": "SPDXRef-image", "relationshipType": "CONTAINS",
                     "relatedSpdxElement": spdx_id})

    def sid(kind: str, n: str, v: str) -> str:
        return f"SPDXRef-{kind}-" + re.sub(r"[^A-Za-z0-9.-]", "-", f"{n}-{v}")

    for deb in stages["base"].packages:
        n, v = deb["Package"], deb["Version"]
        a = deb.get("Architecture", arch)
        add(sid("deb", n, v), {
            "name": n, "versionInfo": v,
            "supplier": f"Organization: {deb.get('Maintainer', 'Debian')}"[:200],
            "sourceInfo": f"Debian source package {deb.get('Source', n).split()[0]}",
            "licenseConcluded": "NOASSERTION", "licenseDeclared": "NOASSERTION",
            "comment": f"License in /usr/share/doc/{n}/copyright",
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": f"pkg:deb/debian/{n}@{v}?arch={a}"
                                                  f"&distro=debian-12"}]})
    for stage in ("deps", "app"):
        for py in stages[stage].packages:
            n, v = py["name"], py["version"]
            lic = py["license"] if re.fullmatch(r"[A-Za-z0-9.\-+ ()]+", py["license"] or "") \
                and " " not in py["license"].strip() else "NOASSERTION"
            add(sid("pypi", n, v), {
                "name": n, "versionInfo": v, "supplier": "NOASSERTION",
                "licenseConcluded": "NOASSERTION", "licenseDeclared": lic,
                "comment": ("License: " + (py["license"] or py["license_classifiers"]))[:500],
                "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER",
                                  "referenceType": "purl",
                                  "referenceLocator": f"pkg:pypi/{n.lower()}@{v}"}]})
    created = dt.datetime.fromtimestamp(p.epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc_ns = uuid.uuid5(uuid.NAMESPACE_URL, f"{p.source}/{image}/{arch}/{p.revision}")
    return {
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT",
        "name": name, "documentNamespace": f"{p.source}/spdx/{doc_ns}",
        "creationInfo": {"created": created, "creators": ["Tool: pqfed-images/build.py"]},
        "packages": [{"SPDXID": "SPDXRef-image", "name": ref(image, p.version),
                      "versionInfo": p.version, "downloadLocation": "NOASSERTION",
                      "filesAnalyzed": False, "primaryPackagePurpose": "CONTAINER",
                      "licenseConcluded": "NOASSERTION", "licenseDeclared": "Apache-2.0",
                      "copyrightText": "NOASSERTION"}, *pkgs],
        "relationships": [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                           "relatedSpdxElement": "SPDXRef-image"}, *rels],
    }
