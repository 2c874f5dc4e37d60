//! hello: the example service that kiln bakes into an image. A small HTTP/1.1 server on std alone, because the
//! image build compiles this one file with plain `rustc` and no crates.
//!
//! Environment: PORT (required), GREETING (default "hello"), KILN_INSTANCE (set by kiln; names the answering
//! instance), HOST (default 127.0.0.1; set 0.0.0.0 where a load balancer must reach it).
//!
//! GET /healthz -> 200 "ok"; GET / -> 200 "<GREETING> from <KILN_INSTANCE>\n"; anything else -> 404.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// An idle keep-alive connection is closed after this; longer than a proxy's pool idle time, so the proxy is the
/// side that gives up an idle connection and never races a request against our close.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_LINE: usize = 8 * 1024;
const MAX_HEADERS: usize = 100;
/// Each connection has a thread; past this many, new connections get a 503 rather than exhausting the host.
const MAX_CONNECTIONS: usize = 1024;

struct Config {
    greeting: String,
    instance: String,
}

struct Request {
    method: String,
    path: String,
    keep_alive: bool,
}

enum ReadError {
    /// The peer closed or went idle between requests: nothing to answer.
    Closed,
    /// The bytes are not a request we can frame: answer 400 and close.
    Bad(&'static str),
}

impl From<io::Error> for ReadError {
    fn from(_: io::Error) -> Self {
        ReadError::Closed
    }
}

fn main() {
    let port = match std::env::var("PORT").ok().and_then(|p| p.parse::<u16>().ok()) {
        Some(p) => p,
        None => {
            eprintln!("hello: PORT must be set to a port number");
            std::process::exit(2);
        }
    };
    let host = std::env::var("HOST").unwrap_or_else(|_| "127.0.0.1".to_string());
    let config = Arc::new(Config {
        greeting: std::env::var("GREETING").unwrap_or_else(|_| "hello".to_string()),
        instance: std::env::var("KILN_INSTANCE").unwrap_or_else(|_| "hello".to_string()),
    });
    let listener = match TcpListener::bind((host.as_str(), port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hello: cannot listen on {host}:{port}: {e}");
            std::process::exit(1);
        }
    };
    println!("hello: {} listening on {host}:{port}", config.instance);
    let open = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors or a connection reset while queued: the listener itself is fine.
                eprintln!("hello: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            let mut stream = stream;
            let _ = respond(&mut stream, 503, "busy\n", false, false);
            continue;
        }
        let config = Arc::clone(&config);
        let guard = Open(Arc::clone(&open));
        let spawned = std::thread::Builder::new().spawn(move || {
            let _guard = guard;
            if let Err(e) = serve(stream, &config) {
                if e.kind() != io::ErrorKind::BrokenPipe && e.kind() != io::ErrorKind::ConnectionReset {
                    eprintln!("hello: connection: {e}");
                }
            }
        });
        if let Err(e) = spawned {
            eprintln!("hello: cannot start a connection thread: {e}");
        }
    }
}

/// Counts a connection as open until its thread ends, whichever way it ends.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve(stream: TcpStream, config: &Config) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let _ = stream.set_nodelay(true);
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let request = match read_request(&mut reader) {
            Ok(r) => r,
            Err(ReadError::Closed) => return Ok(()),
            Err(ReadError::Bad(why)) => return respond(&mut writer, 400, why, false, false),
        };
        let head = request.method == "HEAD";
        let (status, body) = match (request.method.as_str(), route(&request.path)) {
            ("GET" | "HEAD", "/healthz") => (200, "ok".to_string()),
            ("GET" | "HEAD", "/") => (200, format!("{} from {}\n", config.greeting, config.instance)),
            _ => (404, "not found\n".to_string()),
        };
        respond(&mut writer, status, &body, request.keep_alive, head)?;
        if !request.keep_alive {
            return Ok(());
        }
    }
}

/// The path without its query string.
fn route(target: &str) -> &str {
    target.split('?').next().unwrap_or(target)
}

fn respond(w: &mut TcpStream, status: u16, body: &str, keep_alive: bool, head: bool) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: {connection}\r\n\r\n",
        body.len()
    );
    if !head {
        out.push_str(body);
    }
    // One write, so a response is either wholly sent or not at all as far as a proxy's retry logic can tell.
    w.write_all(out.as_bytes())?;
    w.flush()
}

/// Reads one line up to CRLF (or bare LF), without the line ending, refusing lines longer than MAX_LINE.
fn read_line(r: &mut BufReader<TcpStream>) -> Result<String, ReadError> {
    let mut line = Vec::new();
    let n = r.by_ref().take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(ReadError::Closed);
    }
    if line.last() != Some(&b'\n') {
        return Err(if line.len() > MAX_LINE { ReadError::Bad("line too long\n") } else { ReadError::Closed });
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| ReadError::Bad("not UTF-8\n"))
}

fn read_request(r: &mut BufReader<TcpStream>) -> Result<Request, ReadError> {
    let mut line = read_line(r)?;
    // RFC 9112 2.2: a server should ignore empty lines received before a request line.
    while line.is_empty() {
        line = read_line(r)?;
    }
    let mut parts = line.split(' ');
    let (Some(method), Some(path), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ReadError::Bad("malformed request line\n"));
    };
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(ReadError::Bad("unsupported HTTP version\n")),
    };
    let mut keep_alive = http11;
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut count = 0;
    loop {
        let header = read_line(r)?;
        if header.is_empty() {
            break;
        }
        count += 1;
        if count > MAX_HEADERS {
            return Err(ReadError::Bad("too many headers\n"));
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(ReadError::Bad("malformed header\n"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = value.parse().map_err(|_| ReadError::Bad("bad content-length\n"))?;
            if content_length.is_some_and(|old| old != n) {
                return Err(ReadError::Bad("conflicting content-length\n"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.rsplit(',').next().is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            if !chunked {
                return Err(ReadError::Bad("unsupported transfer-encoding\n"));
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") && !http11 {
                    keep_alive = true;
                }
            }
        }
    }
    // The body is ignored but must be consumed, or its bytes would be read as the next request.
    if chunked {
        // RFC 9112 6.1: Transfer-Encoding overrides Content-Length; a request carrying both is suspect, so the
        // connection is not reused after it.
        if content_length.is_some() {
            keep_alive = false;
        }
        skip_chunked(r)?;
    } else if let Some(n) = content_length {
        let skipped = io::copy(&mut r.by_ref().take(n), &mut io::sink())?;
        if skipped != n {
            return Err(ReadError::Closed);
        }
    }
    Ok(Request { method: method.to_string(), path: path.to_string(), keep_alive })
}

fn skip_chunked(r: &mut BufReader<TcpStream>) -> Result<(), ReadError> {
    loop {
        let line = read_line(r)?;
        let size = line.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size, 16).map_err(|_| ReadError::Bad("bad chunk size\n"))?;
        if size == 0 {
            // Trailer fields, up to the empty line that ends the message.
            while !read_line(r)?.is_empty() {}
            return Ok(());
        }
        let skipped = io::copy(&mut r.by_ref().take(size), &mut io::sink())?;
        if skipped != size || !read_line(r)?.is_empty() {
            return Err(ReadError::Bad("malformed chunk\n"));
        }
    }
}
