"""What a method returns (:class:`Result`) and how it is written to and read from an output folder."""
