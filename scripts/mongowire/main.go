// Command mongowire is MWM's local MongoDB-wire server: FerretDB on SQLite, one file per database.
package main

import (
	"context"
	"flag"
	"log"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

// sqlitePragmas are added to FerretDB's own (WAL, busy timeout). A multi-row INSERT keeps a statement
// journal, which SQLite spills to a temporary file past 64 KiB: with temp_store(memory) a batch of
// idempotency keys no longer opens and writes a file on every commit. Durability is unchanged.
const sqlitePragmas = "?_pragma=temp_store(memory)"

func main() {
	listen := flag.String("listen", "127.0.0.1:27017", "TCP address to listen on")
	dir := flag.String("dir", "", "directory for SQLite files")
	flag.Parse()
	if *dir == "" {
		log.Fatal("-dir is required")
	}
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		log.Fatal(err)
	}
	f, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: *listen},
		Handler:   "sqlite",
		SQLiteURL: "file:" + *dir + "/" + sqlitePragmas,
		Logger:    slog.New(&lazyAttrs{inner: slog.Default().Handler()}),
	})
	if err != nil {
		log.Fatal(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log.Printf("ferretdb listening on %s", *listen)
	f.Run(ctx)
}

// lazyAttrs formats a logger's attributes only for records that are written. FerretDB's SQL layer calls
// Logger.With(args) around every statement, for Debug records that are then dropped, and slog's own
// handlers render those attributes at once: the arguments of a bulk insert, quoted, twice per statement
// (a tenth of the server's CPU when inserting idempotency keys).
type lazyAttrs struct {
	inner slog.Handler
	attrs []slog.Attr
}

func (h *lazyAttrs) Enabled(ctx context.Context, level slog.Level) bool {
	return h.inner.Enabled(ctx, level)
}

func (h *lazyAttrs) Handle(ctx context.Context, record slog.Record) error {
	return h.resolved().Handle(ctx, record)
}

func (h *lazyAttrs) WithAttrs(attrs []slog.Attr) slog.Handler {
	// A full slice expression: siblings derived from one logger must not share a backing array.
	return &lazyAttrs{inner: h.inner, attrs: append(h.attrs[:len(h.attrs):len(h.attrs)], attrs...)}
}

func (h *lazyAttrs) WithGroup(name string) slog.Handler {
	return &lazyAttrs{inner: h.resolved().WithGroup(name)}
}

// resolved is the wrapped handler with the deferred attributes applied.
func (h *lazyAttrs) resolved() slog.Handler {
	if len(h.attrs) == 0 {
		return h.inner
	}
	return h.inner.WithAttrs(h.attrs)
}
