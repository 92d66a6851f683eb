package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// argSpec describes a qemu-img sub-command's options the way qemu-img's
// getopt_long call does: short options ("f:" takes an argument) and long
// options (name -> takes an argument).
type argSpec struct {
	short string
	long  map[string]bool
	// negativeLast: a last argument that looks like a negative number is a
	// positional argument (qemu-img resize f -1G), as qemu-img does by
	// taking it out before getopt runs.
	negativeLast bool
}

// parsedArgs is the result: options in order (repeatable ones like -o are
// merged by the caller) and positional arguments.
type parsedArgs struct {
	opts []optVal
	pos  []string
}

type optVal struct {
	name string // "f" or "output"
	val  string
}

func (p *parsedArgs) has(name string) bool {
	for _, o := range p.opts {
		if o.name == name {
			return true
		}
	}
	return false
}

// get returns the last value of an option.
func (p *parsedArgs) get(name string) (string, bool) {
	v, ok := "", false
	for _, o := range p.opts {
		if o.name == name {
			v, ok = o.val, true
		}
	}
	return v, ok
}

// wantsHelp prints the usage line of img command name when -h or --help
// was given, and reports whether it did.
func (p *parsedArgs) wantsHelp(name string) bool {
	if !p.has("h") && !p.has("help") {
		return false
	}
	fmt.Println("Usage: qcow2-csi img " + imgCommands[name].usage)
	return true
}

// outputFormat returns --output as info and map take it: human unless json
// is asked for; any other value is qemu-img's error.
func (p *parsedArgs) outputFormat() (string, error) {
	output, _ := p.get("output")
	switch output {
	case "":
		return "human", nil
	case "human", "json":
		return output, nil
	}
	return "", errors.New("--output must be used with human or json as argument.")
}

// all returns every value of a repeatable option.
func (p *parsedArgs) all(name string) []string {
	var out []string
	for _, o := range p.opts {
		if o.name == name {
			out = append(out, o.val)
		}
	}
	return out
}

func (s argSpec) shortTakesArg(c byte) (known, takes bool) {
	i := strings.IndexByte(s.short, c)
	if i < 0 || c == ':' {
		return false, false
	}
	return true, i+1 < len(s.short) && s.short[i+1] == ':'
}

// parseArgs parses args with GNU getopt_long rules: options may follow
// positional arguments, "--" ends options, -abc groups short flags, -ffmt
// and -f fmt both work, --long=value and --long value both work.
func parseArgs(args []string, s argSpec) (*parsedArgs, error) {
	p := &parsedArgs{}
	var tail []string
	if s.negativeLast && len(args) > 0 && isNegativeNumber(args[len(args)-1]) {
		tail = args[len(args)-1:]
		args = args[:len(args)-1]
	}
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			p.pos = append(p.pos, args[i+1:]...)
			i = len(args)
		case strings.HasPrefix(a, "--"):
			name, val, hasVal := strings.Cut(a[2:], "=")
			name, err := s.longName(name, a)
			if err != nil {
				return nil, err
			}
			takes := s.long[name]
			if takes && !hasVal {
				if i+1 >= len(args) {
					return nil, fmt.Errorf("option '--%s' requires an argument", name)
				}
				i++
				val = args[i]
			} else if !takes && hasVal {
				return nil, fmt.Errorf("option '--%s' doesn't allow an argument", name)
			}
			p.opts = append(p.opts, optVal{name, val})
		case len(a) > 1 && a[0] == '-':
			for j := 1; j < len(a); j++ {
				known, takes := s.shortTakesArg(a[j])
				if !known {
					return nil, fmt.Errorf("invalid option -- '%c'", a[j])
				}
				if !takes {
					p.opts = append(p.opts, optVal{string(a[j]), ""})
					continue
				}
				val := a[j+1:]
				if val == "" {
					if i+1 >= len(args) {
						return nil, fmt.Errorf("option requires an argument -- '%c'", a[j])
					}
					i++
					val = args[i]
				}
				p.opts = append(p.opts, optVal{string(a[j]), val})
				break
			}
		default:
			p.pos = append(p.pos, a)
		}
	}
	p.pos = append(p.pos, tail...)
	return p, nil
}

// longName resolves a long option as getopt_long does: an exact name, or
// an unambiguous prefix of one ("--shr" for "--shrink").
func (s argSpec) longName(name, arg string) (string, error) {
	if _, ok := s.long[name]; ok {
		return name, nil
	}
	match := ""
	for l := range s.long {
		if name != "" && strings.HasPrefix(l, name) {
			if match != "" {
				return "", fmt.Errorf("option '%s' is ambiguous", arg)
			}
			match = l
		}
	}
	if match == "" {
		return "", fmt.Errorf("unrecognized option '%s'", arg)
	}
	return match, nil
}

func isNegativeNumber(a string) bool {
	return len(a) > 1 && a[0] == '-' && a[1] >= '0' && a[1] <= '9'
}

// parseSize parses qemu's size syntax: a number with an optional suffix
// k/K, M, G, T, P, E (powers of 1024; b/B or none is bytes), fractions
// allowed with a suffix ("1.5G").
func parseSize(s string) (int64, error) {
	if s == "" {
		return 0, fmt.Errorf("empty size")
	}
	mult := int64(1)
	num := s
	switch last := s[len(s)-1]; last {
	case 'b', 'B':
		num = s[:len(s)-1]
	case 'k', 'K':
		mult, num = 1<<10, s[:len(s)-1]
	case 'm', 'M':
		mult, num = 1<<20, s[:len(s)-1]
	case 'g', 'G':
		mult, num = 1<<30, s[:len(s)-1]
	case 't', 'T':
		mult, num = 1<<40, s[:len(s)-1]
	case 'p', 'P':
		mult, num = 1<<50, s[:len(s)-1]
	case 'e', 'E':
		mult, num = 1<<60, s[:len(s)-1]
	}
	if n, err := strconv.ParseInt(num, 10, 64); err == nil {
		if n < 0 || (mult > 1 && n > (1<<63-1)/mult) {
			return 0, fmt.Errorf("value out of range")
		}
		return n * mult, nil
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f < 0 || f*float64(mult) >= 1<<63 {
		return 0, fmt.Errorf("invalid size %q", s)
	}
	return int64(f * float64(mult)), nil
}

// optionList is a parsed -o string (key=value pairs, ",," escapes a comma),
// in order.
type optionList []optVal

func parseOptionList(s string) (optionList, error) {
	var out optionList
	var cur strings.Builder
	flush := func() error {
		item := cur.String()
		cur.Reset()
		if item == "" {
			return nil
		}
		k, v, ok := strings.Cut(item, "=")
		if !ok {
			if k == "help" || k == "?" {
				out = append(out, optVal{"help", ""})
				return nil
			}
			return fmt.Errorf("Invalid parameter '%s'", k)
		}
		out = append(out, optVal{k, v})
		return nil
	}
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			if err := flush(); err != nil {
				return nil, err
			}
			continue
		}
		cur.WriteByte(s[i])
	}
	if err := flush(); err != nil {
		return nil, err
	}
	return out, nil
}

// parseBool accepts qemu's on/off spellings.
func parseBool(key, v string) (bool, error) {
	switch v {
	case "on", "yes", "true", "y":
		return true, nil
	case "off", "no", "false", "n":
		return false, nil
	}
	return false, fmt.Errorf("Parameter '%s' expects 'on' or 'off'", key)
}

// imgErr prints a qemu-img style error and returns exit code 1.
func imgErr(format string, args ...any) int {
	fmt.Fprintf(os.Stderr, "qcow2-csi img: "+format+"\n", args...)
	return 1
}
