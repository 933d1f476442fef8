"""How the node names itself in the objects it writes, and recognises them when they
come back (loop safety: a PACS routing our own SEG and SR back to us)."""

#: Manufacturer (and Manufacturer's Model Name) of every object this node produces.
NODE_MANUFACTURER = "dicom-node"
