package main

import (
	"fmt"
	"strings"
)

func init() {
	registerImgCommand(imgCommand{
		name:  "map",
		usage: "map [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--start-offset=offset] [--max-length=len] [-U] filename",
		run:   runImgMap,
	})
}

func runImgMap(args []string) int {
	pa, err := parseArgs(args, argSpec{short: "f:hsl:U", long: map[string]bool{"output": true, "start-offset": true, "max-length": true, "force-share": false, "help": false, "object": true, "image-opts": false}})
	if err != nil {
		return imgErr("%v", err)
	}
	if pa.wantsHelp("map") {
		return 0
	}
	if len(pa.pos) != 1 {
		return imgErr("Expecting one image file name")
	}
	output, err := pa.outputFormat()
	if err != nil {
		return imgErr("%v", err)
	}
	var start, maxLen int64 = 0, -1
	if v, ok := pa.get("start-offset"); ok {
		if start, err = parseSize(v); err != nil {
			return imgErr("Invalid start offset specified! You may use k, M, G, T, P or E suffixes for ")
		}
	}
	if v, ok := pa.get("max-length"); ok {
		if maxLen, err = parseSize(v); err != nil {
			return imgErr("Invalid length specified! You may use k, M, G, T, P or E suffixes for ")
		}
	}
	format, _ := pa.get("f")
	ref, wipe, err := imageFromArgs(pa, pa.pos[0], format)
	if err != nil {
		return imgErr("%v", err)
	}
	defer wipe()
	img, err := openImgRef(ref, false, pa.has("U") || pa.has("force-share"))
	if err != nil {
		return imgErr("%v", err)
	}
	defer img.Close()
	length := img.Size() - start
	if maxLen >= 0 {
		length = min(length, maxLen)
	}
	exts, err := img.BlockStatus(start, max(length, 0))
	if err != nil {
		return imgErr("%v", err)
	}
	if output == "json" {
		var b strings.Builder
		b.WriteString("[")
		for i, x := range exts {
			if i > 0 {
				b.WriteString(",\n")
			}
			fmt.Fprintf(&b, `{ "start": %d, "length": %d, "depth": %d, "present": %t, "zero": %t, "data": %t`, x.Start, x.Length, x.Depth, x.Present, x.Zero, x.Data)
			if x.Offset >= 0 {
				fmt.Fprintf(&b, `, "offset": %d`, x.Offset)
			}
			b.WriteString("}")
		}
		b.WriteString("]")
		fmt.Println(b.String())
		return 0
	}
	fmt.Printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File")
	for _, x := range exts {
		if x.Data && x.Offset < 0 {
			// qemu-img cannot name a host offset for these either.
			return imgErr("File contains external, encrypted or compressed clusters.")
		}
		if x.Data && x.Offset >= 0 {
			fmt.Printf("%-16s%-16s%-16s%s\n", cHex(x.Start), cHex(x.Length), cHex(x.Offset), x.Filename)
		}
	}
	return 0
}

// cHex is C's "%#x": 0 prints as "0", others with a 0x prefix.
func cHex(v int64) string {
	if v == 0 {
		return "0"
	}
	return fmt.Sprintf("%#x", v)
}
